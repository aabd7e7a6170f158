"""The target's half of a live migration: what `kvmrun migrate` (kvmrun.ops.migrate, on the
source) asks of this host through one `ssh HOST kvmrun migrate-target session` (JSON lines
on stdin and stdout; kvmrun.ops.migrate_session), or `migrate-target STEP` for one step.

    preflight   (kvmrun.ops.migrate_preflight) QEMU here and not older, the user it runs
                as, the machine type, forwards' ports free, the NICs' networks (bridge,
                isolated, NAT) present, disk paths (present under shared storage, nfs://
                URLs too; absent when they are to be copied; an ephemeral disk's base
                present)
    prepare     preflight first (its problems answered, nothing made), then
                the run directory from the source's launch record (paths rewritten, the
                pinned machine type, -incoming defer -S; a TPM's swtpm there on an empty
                state directory, QEMU sets its state from the stream), the disks to copy
                created (an ephemeral disk's overlay on its base), the NICs' taps and hub
                ports, the serial log so far, a supervisor started with --incoming; then
                incoming:
    incoming    NBD exports of the copied disks on nbd.sock, and migrate.sock for the stream:
                both bound here and handed to QEMU (getfd), which runs as the source's
                QEMU did (`-runas`) and so may reach no path in root's run directory
    finish      NBD stopped, `cont`, the VM defined here
    abort       everything prepare made removed (the QEMU and its helpers, run directory,
                disks, vars, TPM state directory)
    session     held open by the source for the whole migration: every step above goes
                through it (a JSON line each way), and between them a line "alive" every
                couple of seconds; "done" ends it, while EOF or silence for WATCH_SILENCE
                seconds (the source died, was interrupted, the link was cut) runs abort here
                by itself, whatever sshd's keep-alive settings

What prepare made is listed in the run directory's migration.json, so abort removes exactly
that, even from another ssh session.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

from kvmrun import files
from kvmrun.errors import GuestError, KvmrunError, MigrationError
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.qmp import QMPClient
from kvmrun.guest.rundir import Guest, prepare_run_dir
from kvmrun.ops.migrate_preflight import argv_user, preflight
from kvmrun.proc import identified, open_pidfd, wait_pidfd

QMP_TIMEOUT = 30
WATCH_SILENCE = 15.0


def _rewrite(argv: list[str], req: dict, guest: Guest) -> list[str]:
    """The source's argv for this host: run-directory and variable-store paths, disk
    paths, the pinned machine type, and waiting for the incoming stream."""
    src_dir, dst_dir = req["source_dir"], str(guest.paths.dir)
    swaps = [(src_dir + "/", dst_dir + "/")]
    if req.get("source_nvram"):
        swaps.append((req["source_nvram"], str(guest.paths.nvram)))
    for disk in req["disks"]:
        if disk["copy"] and not disk.get("ephemeral"):
            esc = lambda p: p.replace(",", ",,")
            swaps.append((f"file={esc(disk['source'])},", f"file={esc(disk['target'])},"))
    out = []
    for i, arg in enumerate(argv):
        for old, new in swaps:
            arg = arg.replace(old, new)
        if i > 0 and argv[i - 1] == "-machine" and req.get("machine"):
            arg = ",".join([req["machine"]] + arg.split(",")[1:])
        out.append(arg)
    return [*out, "-incoming", "defer", "-S"]


def _rewrite_helpers(helpers: list[dict], req: dict, guest: Guest) -> list[dict]:
    """The source's helpers for this host (swtpm: its socket in this run directory, its
    state directory this host's, empty: QEMU sets the state from the stream)."""
    swaps = [(req["source_dir"] + "/", str(guest.paths.dir) + "/")]
    if req.get("source_tpm"):
        swaps.append((f"dir={req['source_tpm']},", f"dir={guest.paths.tpm},"))

    def swap(text: str) -> str:
        for old, new in swaps:
            text = text.replace(old, new)
        return text
    return [{**h, "argv": [swap(a) for a in h["argv"]], "socket": swap(h["socket"])}
            for h in helpers]


def prepare(req: dict) -> dict:
    """The preflight, then (when it found no problem) make the target guest and start its
    supervisor (QEMU waiting, paused): one step, one ssh session and one kvmrun start."""
    from kvmrun.storage import images
    checked = preflight(req)
    if checked["problems"]:
        return checked
    guest = Guest(req["name"])
    prepare_run_dir()
    if guest.paths.dir.exists() and guest.qemu_pid() is not None:
        raise GuestError(f"{req['name']} already runs here")
    made = {"disks": [], "nvram": None, "tpm": None, "dir": not guest.paths.dir.exists(),
            "dirs": []}
    files.mkdirs(guest.paths.dir)
    files.write_json(guest.paths.migration, {"role": "target", "made": made})
    for disk in req["disks"]:
        if disk.get("ephemeral"):               # a fresh overlay on the same base
            overlay = guest.paths.overlay(int(disk["drive"].removeprefix("drive-disk")))
            images.create_overlay(overlay, disk["target"], disk["base_format"])
            made["disks"].append(str(overlay))
            files.write_json(guest.paths.migration, {"role": "target", "made": made})
        elif disk["copy"]:
            made["dirs"] += _mkdirs(Path(disk["target"]).parent)
            images.create(disk["target"], disk["size"], disk["format"])
            made["disks"].append(disk["target"])
            files.write_json(guest.paths.migration, {"role": "target", "made": made})
    if req.get("nvram"):
        files.atomic_write(guest.paths.nvram, base64.b64decode(req["nvram"]), 0o600,
                           make_dirs=0o700)
        made["nvram"] = str(guest.paths.nvram)
        files.write_json(guest.paths.migration, {"role": "target", "made": made})
    if req.get("source_tpm"):                 # swtpm's, empty until the stream fills it
        made["tpm"] = str(guest.paths.tpm)
        files.write_json(guest.paths.migration, {"role": "target", "made": made})
        files.mkdirs(guest.paths.tpm)
    for leaf, data in req.get("run_files", {}).items():
        files.atomic_write(guest.paths.dir / leaf, base64.b64decode(data), 0o600)
    files.atomic_write(guest.paths.serial_log, base64.b64decode(req.get("serial", "")), 0o600)
    record = dict(req["launch"])
    record["argv"] = _rewrite(record["argv"], req, guest)
    record["helpers"] = _rewrite_helpers(record.get("helpers", []), req, guest)
    record["disks"] = [d["target"] for d in req["disks"]] or record.get("disks", [])
    record["machine_type"] = req.get("machine")
    user = argv_user(record["argv"])
    if user is not None:
        from kvmrun.qemu.host import ensure_qemu_user
        ensure_qemu_user(user)
    if isinstance(record.get("summary"), dict):
        from kvmrun.qemu.host import user_name
        record["summary"] = {**record["summary"],
                             "qemu_user": user or user_name(os.geteuid())}
    LaunchRecord.from_json(record).write(guest.paths.launch)
    if req.get("networks"):
        from kvmrun.net.nics import attach
        attach(req["networks"], req["name"], guest.paths)      # in network.json
    _spawn(guest)
    incoming({"name": req["name"], "exports": req.get("exports", [])})
    return {"run_dir": str(guest.paths.dir), "migrate_sock": str(guest.paths.migrate_sock),
            "nbd_sock": str(guest.paths.nbd_sock)}


def _mkdirs(directory: Path) -> list[str]:
    """Make `directory` and its missing parents; the ones made, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(str(directory))
        directory = directory.parent
    for path in reversed(missing):
        os.mkdir(path, 0o755)
    return missing


def _spawn(guest: Guest) -> None:
    from kvmrun.guest.supervisor import command as supervisor_command
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    with open(guest.paths.supervisor_log, "ab") as errlog:
        subprocess.Popen(supervisor_command(guest.name, guest.paths.dir.parent, "--incoming",
                                            "--ready-fd", str(wfd)),
                         pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=errlog, start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        while True:
            if not select.select([pipe], [], [], QMP_TIMEOUT + 5)[0]:
                raise MigrationError("the target QEMU did not come up")
            line = pipe.readline()
            if not line:
                raise MigrationError("the target supervisor exited: "
                                     + files.read_text(guest.paths.supervisor_log)[-500:])
            message = json.loads(line)
            if message["event"] == "failed":
                raise MigrationError(f"QEMU failed to start here: {message['message']}: "
                                     f"{message.get('stderr', '')}")
            if message["event"] == "qmp":
                return


# guest name -> the listening migrate.sock of its incoming stream (session hands it over)
LISTENING: dict[str, socket.socket] = {}


def _listen(path: Path) -> socket.socket:
    files.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock


def incoming(req: dict) -> dict:
    """The NBD exports of the copied disks and the incoming stream. Both sockets are bound
    here (root's run directory) and handed to QEMU, which may run as another user: the NBD
    server gets its listening socket (getfd, nbd-server-start on it); the stream's
    connection is accepted here by the session, then given to `migrate-incoming fd:`."""
    guest = Guest(req["name"])
    with QMPClient(guest.paths.qmp_cli, timeout=QMP_TIMEOUT) as qmp:
        if req.get("exports"):
            nbd = _listen(guest.paths.nbd_sock)
            try:
                qmp.execute("getfd", {"fdname": "nbd-in"}, fds=[nbd.fileno()])
            finally:
                nbd.close()
            qmp.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nbd-in"}}})
            for drive in req["exports"]:
                qmp.execute("nbd-server-add", {"device": drive, "writable": True})
    old = LISTENING.pop(req["name"], None)
    if old is not None:
        old.close()
    LISTENING[req["name"]] = _listen(guest.paths.migrate_sock)
    return {"ok": True}


def _hand_over(name: str) -> None:
    """The source connected to migrate.sock: its connection becomes QEMU's incoming
    stream. A failure here shows as the source's migration failing (its rollback)."""
    listener = LISTENING.pop(name)
    try:
        conn, _ = listener.accept()
    finally:
        listener.close()
    try:
        with QMPClient(Guest(name).paths.qmp_cli, timeout=QMP_TIMEOUT) as qmp:
            qmp.execute("getfd", {"fdname": "migrate-in"}, fds=[conn.fileno()])
            qmp.execute("migrate-incoming", {"uri": "fd:migrate-in"})
    except (KvmrunError, OSError):
        pass
    finally:
        conn.close()


def finish(req: dict) -> dict:
    """After the stream completed (and the mirrors ended): run the guest, define the VM.
    Its record goes first, under the lock abort takes: once finish runs, a late abort (the
    watch timing out) leaves the guest alone; once abort ran, finish refuses."""
    guest = Guest(req["name"])
    with files.flocked(guest.paths.dir / "migration.lock"):
        record = files.read_json(guest.paths.migration, {}) or {}
        if record.get("role") != "target":
            raise MigrationError("the target was already removed (the migration timed out)")
        files.unlink(guest.paths.migration)
    with QMPClient(guest.paths.qmp_cli, timeout=QMP_TIMEOUT) as qmp:
        status = _loaded(qmp)
        if status.get("status") not in ("paused", "postmigrate", "prelaunch", "running"):
            raise MigrationError(f"the target is {status.get('status')}, not ready to run")
        if req.get("exports"):
            qmp.execute("nbd-server-stop")
        if req.get("serial"):                 # QEMU appends to it: this goes first
            with open(guest.paths.serial_log, "ab") as log:
                log.write(base64.b64decode(req["serial"]))
        qmp.execute("cont")
    defined = None
    if req.get("profile"):
        defined = _define(req)
    return {"ok": True, "defined": defined}


def _loaded(qmp: QMPClient, timeout: float = QMP_TIMEOUT) -> dict:
    """query-status once this QEMU has loaded all the stream: the source's migration
    completes when it has sent the last of it, a moment before this side is done."""
    deadline = time.monotonic() + timeout
    while (status := qmp.execute("query-status")).get("status") == "inmigrate":
        incoming = qmp.execute("query-migrate")
        if incoming.get("status") in ("failed", "cancelled"):
            raise MigrationError("the incoming migration failed here: "
                                 + incoming.get("error-desc", "QEMU gave no reason"))
        if time.monotonic() > deadline:
            raise MigrationError(f"the incoming migration did not end here in {timeout:g} s")
        time.sleep(0.01)
    return status


def _define(req: dict) -> str:
    import yaml

    from kvmrun.ops import defined
    from kvmrun.profile import from_mapping
    profile = from_mapping(yaml.safe_load(req["profile"]), {}, f"{req['name']} (migrated)")
    return str(defined.define(profile, req["name"], force=True).path)


def abort(req: dict) -> dict:
    """Remove what prepare made: QEMU (killed: it never ran the guest), the run directory,
    the created disks and variable store."""
    listener = LISTENING.pop(req["name"], None)
    if listener is not None:
        listener.close()
    guest = Guest(req["name"])
    if not guest.paths.dir.exists():
        return {"ok": True, "removed": []}
    with files.flocked(guest.paths.dir / "migration.lock"):
        record = files.read_json(guest.paths.migration, {}) or {}
        if record.get("role") != "target":
            return {"ok": True, "removed": []}
        return _remove(guest, record)


def _remove(guest: Guest, record: dict) -> dict:
    state = guest.read_state() or {}
    for pid_key, start_key in (("qemu_pid", "qemu_starttime"),
                               ("supervisor_pid", "supervisor_starttime")):
        pid = state.get(pid_key)
        if pid and identified(pid, state.get(start_key)):
            try:
                fd = open_pidfd(pid)
                import signal
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                wait_pidfd(fd, 10)
                os.close(fd)
            except (OSError, GuestError):
                pass
    _wait_gone(guest)
    from kvmrun.guest import helpers, netrecord
    # the supervisor was killed, not its helpers: swtpm ends here
    helpers.end_recorded((guest.read_state() or state).get("helpers"))
    netrecord.teardown(guest.paths)           # the taps and hub ports prepare made
    made = record.get("made", {})
    removed = []
    for path in made.get("disks", []) + ([made["nvram"]] if made.get("nvram") else []):
        if os.path.exists(path):
            os.unlink(path)
            removed.append(path)
    for directory in made.get("dirs", []):
        try:
            os.rmdir(directory)
        except OSError:
            pass                              # not empty: someone else's files too
    if made.get("tpm"):
        shutil.rmtree(made["tpm"], ignore_errors=True)
        removed.append(made["tpm"])
    if made.get("dir"):
        shutil.rmtree(guest.paths.dir, ignore_errors=True)
    else:
        guest.clear_runtime()
        files.unlink(guest.paths.migration)
        files.unlink(guest.paths.dir / "migration.lock")
    return {"ok": True, "removed": removed}


def read_request(fd: int = 0) -> tuple[dict, bytes]:
    """The JSON request line on `fd` (unbuffered reads, so `session` sees what follows
    it), and the bytes read past it."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return json.loads(line or b"{}"), rest


def session(req: dict, pending: bytes = b"", fd: int = 0, out: int = 1) -> None:
    """The source's one session (kvmrun.ops.migrate_session): `req` names the guest; then
    each line is "alive", "done" (the migration succeeded: keep what was made, end) or a
    step's request {"step": …, …}, answered with one line {"result": …} or {"error": …,
    "hint": …}. EOF, or no line for WATCH_SILENCE seconds between steps (the source died,
    was interrupted, the link was cut), runs abort here by itself, whatever sshd's
    keep-alive settings."""
    while True:
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            line = line.strip()
            if line == b"done":
                return
            if line.startswith(b"{"):
                os.write(out, json.dumps(_answer(json.loads(line))).encode() + b"\n")
        waiting = {sock.fileno(): name for name, sock in LISTENING.items()}
        ready = select.select([fd, *waiting], [], [], WATCH_SILENCE)[0]
        for one in ready:
            if one in waiting:
                _hand_over(waiting[one])
        if fd in ready:
            chunk = os.read(fd, 1 << 16)
        elif ready:
            continue
        else:
            chunk = b""                       # silence: the source or the link is gone
        if not chunk:
            abort(req)
            return
        pending += chunk


def _answer(request: dict) -> dict:
    step = STEPS.get(request.pop("step", None))
    if step is None:
        return {"error": "unknown step"}
    try:
        return {"result": step(request)}
    except KvmrunError as err:
        return {"error": err.message, "hint": err.hint}
    except Exception as err:                  # noqa: BLE001 - said to the source, not lost
        return {"error": f"{type(err).__name__}: {err}"}


def _wait_gone(guest: Guest, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = guest.read_state() or {}
        if guest.supervisor_pid(state) is None and guest.qemu_pid(state) is None:
            return
        time.sleep(0.1)


STEPS = {"preflight": preflight, "prepare": prepare, "incoming": incoming, "finish": finish,
         "abort": abort}


def serve(step: str) -> None:
    """`kvmrun migrate-target STEP` (served by kvmrun.cli.quick, before typer: the source
    waits for this interpreter's start-up): the request on stdin, the answer on stdout;
    `session` answers a line per step until the source says "done" or goes."""
    if step not in ("preflight", "abort", "session"):     # the others need a session
        raise MigrationError(f"unknown step {step!r}")
    request, rest = read_request()
    if step == "session":
        session(request, rest)
    else:
        os.write(1, json.dumps(STEPS[step](request)).encode() + b"\n")
