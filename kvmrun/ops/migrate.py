"""`kvmrun migrate NAME --to HOST`: move a guest to another host over OpenSSH.

Offline (a stopped, defined VM): its archive with disks (kvmrun.ops.archive) streamed into
`kvmrun import -` there, then undefined here.

Live (a running guest), driving QEMU's own migration and NBD mirror, never a daemon:
  1. preflight there, the first thing its prepare does (kvmrun.ops.migrate_target): QEMU
     present and not older, the versioned machine type the guest really runs (QOM
     /machine's type, pinned in the launch record), forwards' host ports free, the NICs' networks present, disks visible (--shared-storage,
     nfs:// URLs too) or absent (--copy-storage);
  2. the target supervisor starts from this guest's launch record with -incoming defer -S
     (a TPM: its own swtpm first, on an empty state directory there, which QEMU fills
     from the stream: the tpm-emulator backend carries swtpm's state; a virtiofs share is
     refused, QEMU cannot migrate vhost-user-fs);
  3. `ssh -L` forwards unix sockets here to the target's migrate.sock and nbd.sock (they
     and every step there share one ssh connection, remote.one_connection);
  4. --copy-storage: blockdev-mirror of every writable disk to its NBD export there (an
     NBD client node on a connection handed to QEMU with getfd: a QEMU that dropped to
     the kvmrun user never reaches root's sockets by path), until every job is READY (an ephemeral disk's overlay always: a fresh overlay on the same
     base there, its top only);
  5. `migrate`, its downtime limit doubled every few seconds up to a cap (--max-downtime)
     while it does not converge, then given up (the parameters it had are set back);
  6. block-job-cancel of the mirrors and blockdev-del of their nodes, then nbd-server-stop and `cont` there; the VM is
     defined there; here the supervisor records "migrated to HOST" and QEMU quits; the VM is
     undefined here (its variable store and TPM state with it) unless
     --keep-source-definition.
Any failure before step 6 runs the target (Ctrl-C included) cancels the migration and the
mirrors, removes what the target made, and leaves this guest running as it was.
While it lasts, the guest's migration.json here says "migrating to HOST" (`kvmrun status`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from typing import Callable

from kvmrun import files
from kvmrun.errors import GuestError, KvmrunError, MigrationError, QMPError, UsageError
from kvmrun.guest.qmp import QMPClient
from kvmrun.guest.rundir import Guest
from kvmrun.ops import migrate_qemu as mq
from kvmrun.ops import remote
from kvmrun.ops.migrate_session import Lost, Session
from kvmrun.proc import open_pidfd, starttime, wait_pidfd
from kvmrun.records import field, record

Note = Callable[[str], None]
SERIAL_TAIL = 1 << 20        # bytes of serial log carried over


@record
class Plan:
    name: str
    host: remote.Host
    guest: Guest
    copy: bool
    disks: list[dict] = field(default_factory=list)   # source, target, copy, drive, format, size
    jobs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)   # the mirrors' NBD client nodes
    tunnel: object | None = None    # remote.forward_sockets': poll, terminate, wait
    prepared: bool = False
    serial_offset: int = 0          # how much of the serial log the target has
    session: Session | None = None  # the one ssh session that carries every step there
    uncertain: bool = False         # `finish` was sent, and its answer lost
    params: dict = field(default_factory=dict)   # the migration parameters it had before


def migrate(name: str, host: remote.Host, *, offline: bool | None = None,
            copy_storage: bool = False, shared_storage: bool = False,
            target_dir: str | None = None, downtime: int = 100, cap: int | None = None,
            bandwidth: int | None = None, keep_source: bool = False,
            note: Note = lambda m: None) -> dict:
    from kvmrun.ops.defined import is_running
    if copy_storage and shared_storage:
        raise UsageError("--copy-storage and --shared-storage exclude each other")
    if downtime <= 0 or (cap is not None and cap < downtime):
        raise UsageError("--downtime must be positive and --max-downtime not below it")
    running = is_running(name)
    if offline or not running:
        if offline is False:
            raise GuestError(f"{name} is not running; a live migration needs a running guest")
        return migrate_offline(name, host, target_dir, keep_source, note)
    return migrate_live(name, host, copy_storage, shared_storage, target_dir, downtime,
                        cap or max(downtime * 20, 2000), bandwidth, keep_source, note)


# ---------------------------------------------------------------- offline

def migrate_offline(name, host, target_dir, keep_source, note) -> dict:
    from kvmrun.ops import archive, defined
    profile = defined.load(defined.require_defined(name))
    dirs = {os.path.dirname(d.path) for d in profile.disks}
    if target_dir is None and len(dirs) > 1:
        raise UsageError(f"{name}'s disks are in several directories; --target-dir names "
                         "the one they go to there")
    where = target_dir or (dirs.pop() if dirs else None)
    note(f"copying {name} with its disks to {host}")
    summary = archive.export_to(host, profile, directory=where)
    if not keep_source:
        defined.undefine(name)
    return {"name": name, "to": str(host), "mode": "offline",
            "defined": summary["imported"].get("path"), "source_undefined": not keep_source}


# ---------------------------------------------------------------- steps there

def step(host: remote.Host, what: str, request: dict) -> dict:
    """One step there in an ssh session of its own (the live migration's steps share one:
    kvmrun.ops.migrate_session)."""
    code, out, err = remote.capture(host, ["migrate-target", what],
                                    input=json.dumps(request).encode())
    if code != 0:
        said = err.strip().removeprefix("kvmrun: error: ")
        raise MigrationError(f"{what} on {host} failed: {said or f'exit status {code}'}")
    return json.loads(out)


# ---------------------------------------------------------------- live

def _request(plan: Plan, qmp: QMPClient, launch, state: dict) -> dict:
    machine = qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    machine = machine.removesuffix("-machine")
    if launch.machine_type and launch.machine_type != machine:
        raise MigrationError(f"the launch record pins {launch.machine_type} but QEMU runs "
                             f"{machine}")
    version = qmp.execute("query-version")["qemu"]
    ports = []
    for fwd in launch.forwards:
        parts = fwd.split("-")[0].split(":")
        if len(parts) == 3 and parts[2].isdigit():
            ports.append([parts[1], int(parts[2])])
    paths = plan.guest.paths
    nvram = paths.nvram if paths.nvram and paths.nvram.exists() and \
        str(paths.nvram) in " ".join(launch.argv) else None
    serial = b""
    if paths.serial_log.exists():
        with open(paths.serial_log, "rb") as f:
            f.seek(max(0, paths.serial_log.stat().st_size - SERIAL_TAIL))
            serial = f.read()
            plan.serial_offset = f.tell()
    from kvmrun.guest import netrecord
    networks = netrecord.read(paths).get("nics", [])
    run_files = {leaf: base64.b64encode((paths.dir / leaf).read_bytes()).decode()
                 for leaf in ("cidata.iso",) if (paths.dir / leaf).exists()}
    return {"name": plan.name, "binary": launch.argv[0], "qemu_version":
            f"{version['major']}.{version['minor']}.{version['micro']}", "machine": machine,
            "disks": plan.disks, "ports": ports, "networks": networks,
            "launch": launch.to_json(),
            "source_dir": str(paths.dir),
            "source_tpm": str(paths.tpm) if any(h["name"] == "swtpm" for h in launch.helpers)
            else None, "source_nvram": str(nvram) if nvram else None,
            "nvram": base64.b64encode(nvram.read_bytes()).decode() if nvram else None,
            "serial": base64.b64encode(serial).decode(), "run_files": run_files}


def _record(plan: Plan, status: str, **extra) -> None:
    me = os.getpid()
    files.write_json(plan.guest.paths.migration, {
        "role": "source", "to": str(plan.host), "status": status, "pid": me,
        "starttime": starttime(me), "at": time.time(), **extra})


def _check_helpers(name: str, launch) -> None:
    """A TPM moves with the stream (QEMU's tpm-emulator carries swtpm's state blobs: the
    target starts its own swtpm on an empty state directory); a virtiofs share cannot
    (QEMU's vhost-user-fs device is not migratable)."""
    shares = [s for s in launch.shares if s.get("type") == "virtiofs"]
    if shares or any(h["name"].startswith("virtiofsd") for h in launch.helpers):
        named = ", ".join(f"{s.get('tag')} ({s.get('path')})" for s in shares) or "virtiofsd"
        raise MigrationError(f"{name} has a virtiofs share ({named}): QEMU cannot migrate "
                             "a vhost-user-fs device live",
                             hint=f"stop it, then `kvmrun migrate {name} --to HOST` moves it "
                                  "offline; or use a 9p share")


def migrate_live(name, host, copy_storage, shared_storage, target_dir, downtime, cap,
                 bandwidth, keep_source, note) -> dict:
    guest = Guest(name)
    launch = guest.read_launch()
    _check_helpers(name, launch)
    plan = Plan(name, host, guest, copy_storage)
    started = time.monotonic()
    with QMPClient(guest.paths.qmp_cli, timeout=30) as qmp:
        plan.disks = mq.disks(qmp, launch, copy_storage, target_dir)
        _pool_volumes(name, plan.disks)
        writable = [d for d in plan.disks if d["source"] not in launch.shared_disks
                    and not d.get("ephemeral")]
        if writable and not (copy_storage or shared_storage):
            raise UsageError(f"{name} has writable disks: say --copy-storage (mirror them "
                             "over) or --shared-storage (the target sees the same files)")
        request = _request(plan, qmp, launch, guest.read_state() or {})
        _record(plan, "preflight")
        with remote.one_connection(host):        # one ssh handshake for every step
            try:
                result = _run(plan, qmp, request, downtime, cap, bandwidth, note)
            except BaseException:
                _rollback(plan, qmp, note)
                files.unlink(guest.paths.migration)
                raise
            _finish_source(plan, qmp, note)
            _end_session(plan, done=True)
    result.update(name=name, to=str(host), mode="live",
                  total_seconds=round(time.monotonic() - started, 2))
    if not keep_source:
        from kvmrun.ops import defined
        from kvmrun.paths import is_defined
        if is_defined(name):
            defined.undefine(name, keep_nvram=False)
            result["source_undefined"] = True
    return result


def _pool_volumes(name: str, disks: list[dict]) -> None:
    """Mark the disks that stay where they are and are a pool's volume in the definition:
    the target must have that pool, with the volume at the same path (or nfs:// URL)."""
    from kvmrun.paths import is_defined
    if not is_defined(name):
        return
    from kvmrun.ops import defined
    profile = defined.load(defined.defined_path(name))
    for mine, disk in zip(disks, profile.disks):
        if disk.pool and not mine["copy"] and disk.path == mine["source"]:
            mine["pool"], mine["volume"] = disk.pool, disk.volume


def _run(plan: Plan, qmp: QMPClient, request: dict, downtime, cap, bandwidth, note) -> dict:
    note(f"checking and starting the target on {plan.host}")
    plan.session = Session(plan.host, plan.name)
    plan.prepared = True
    exports = [d["drive"] for d in plan.disks if d["copy"]]
    there = plan.session.call("prepare", {**request, "exports": exports})   # and incoming
    if there.get("problems"):                 # its preflight: nothing was made there
        plan.prepared = False
        raise MigrationError(f"{plan.host} cannot take {plan.name}: "
                             + "; ".join(there["problems"]))
    plan.tunnel = _tunnel(plan, there, bool(exports))
    if exports:
        _record(plan, "copying disks")
        mq.mirror(qmp, plan.guest.paths.nbd_out, exports, plan.jobs, plan.nodes,
                  lambda: _tunnel_alive(plan), note,
                  top=frozenset(d["drive"] for d in plan.disks if d.get("ephemeral")))
    _record(plan, "migrating")
    now = qmp.execute("query-migrate-parameters")
    plan.params = {k: now[k] for k in ("downtime-limit", "max-bandwidth") if k in now}
    stats = mq.stream(qmp, plan.guest.paths.migrate_out, downtime, cap, bandwidth,
                      lambda: _tunnel_alive(plan), note,
                      lambda **figures: _record(plan, "migrating", **figures))
    for job in plan.jobs:                       # the source is paused: the mirrors catch up
        qmp.execute("block-job-cancel", {"device": job})
    mq.wait_jobs_gone(qmp, plan.jobs)
    plan.jobs = []
    mq.drop_nodes(qmp, plan.nodes)
    profile = _profile_there(plan)
    try:
        done = plan.session.call("finish", {"name": plan.name, "exports": exports,
                                            "profile": profile, "serial": _serial_rest(plan)})
    except Lost as err:
        if not err.sent:                      # it never reached the target
            raise
        plan.uncertain = True
        raise MigrationError(
            f"lost {plan.host} while it started the guest there ({err.message}); the guest "
            f"is left paused here", hint=f"see `kvmrun -H {plan.host} status {plan.name}`: if "
            f"it runs there, `kvmrun kill {plan.name}` here; if not, `kvmrun resume "
            f"{plan.name}`") from None
    plan.prepared = False                       # it runs there now: no rollback
    plan.session.close(done=True)               # waited for once QEMU here is gone
    stats["defined_there"] = done.get("defined")
    stats["mirrored"] = exports
    return stats


def _end_session(plan: Plan, done: bool) -> None:
    if plan.session is not None:
        plan.session.end(done)
        plan.session = None


def _serial_rest(plan: Plan) -> str:
    """What the console printed here since prepare (the guest is paused now), so the log
    there continues without a gap."""
    try:
        with open(plan.guest.paths.serial_log, "rb") as f:
            f.seek(plan.serial_offset)
            return base64.b64encode(f.read(SERIAL_TAIL)).decode()
    except OSError:
        return ""


def _tunnel(plan: Plan, there: dict, nbd: bool):
    paths = plan.guest.paths
    pairs = [(paths.migrate_out, there["migrate_sock"])]
    if nbd:
        pairs.append((paths.nbd_out, there["nbd_sock"]))
    try:
        return remote.forward_sockets(plan.host, pairs)
    except KvmrunError as err:
        raise MigrationError(f"the ssh tunnel to {plan.host} did not come up: "
                             f"{err.message}") from None


def _tunnel_alive(plan: Plan) -> None:
    if plan.tunnel is not None and plan.tunnel.poll() is not None:
        raise MigrationError(f"the ssh tunnel to {plan.host} closed: "
                             + plan.tunnel.stderr.read().decode(errors="replace").strip())


def _profile_there(plan: Plan) -> str | None:
    """The definition to make there: this VM's, with its disks where they went."""
    from kvmrun.paths import is_defined
    if not is_defined(plan.name):
        return None
    import yaml

    from kvmrun.ops import defined
    data = defined.portable_dict(defined.load(defined.defined_path(plan.name)))
    copied = {d["source"]: d["target"] for d in plan.disks
              if d["copy"] and not d.get("ephemeral")}
    for disk in data.get("disks", []):
        if disk.get("path") in copied:
            disk["path"] = copied[disk["path"]]
            disk.pop("backing", None)       # the mirror flattened the chain into one image
        elif disk.get("pool"):              # shared: the same pool there (preflight saw it)
            disk.pop("path", None)
            continue
        disk.pop("pool", None)
        disk.pop("volume", None)
    return yaml.safe_dump(data, sort_keys=False)


def _rollback(plan: Plan, qmp: QMPClient, note) -> None:
    """Undo a failed migration: cancel it and the mirrors, remove the target's guest,
    and make sure this guest runs as before."""
    note("migration failed: undoing it")
    for command, args in [("migrate_cancel", None)] + [
            ("block-job-cancel", {"device": j, "force": True}) for j in plan.jobs]:
        try:
            qmp.execute(command, args)
        except (QMPError, KvmrunError):
            pass
    if plan.jobs:
        try:
            mq.wait_jobs_gone(qmp, plan.jobs, timeout=30)
        except (QMPError, KvmrunError):
            pass
    try:
        mq.drop_nodes(qmp, plan.nodes)
    except (QMPError, KvmrunError):
        pass
    if plan.params:                     # the guest runs on here as it was
        try:
            qmp.execute("migrate-set-parameters", plan.params)
        except (QMPError, KvmrunError):
            pass
    _close_tunnel(plan)
    if plan.uncertain:                  # it may run there: neither abort it nor run it here
        _end_session(plan, done=False)  # (once finish ran there, an abort is a no-op)
        return
    if plan.prepared:
        try:
            try:
                plan.session.call("abort", {"name": plan.name}, timeout=60)
            except Lost:                # the session is gone: a connection of its own
                step(plan.host, "abort", {"name": plan.name})
        except KvmrunError as err:
            note(f"warning: could not clean up on {plan.host} now ({err.message}); it "
                 "removes what it made by itself when it no longer hears from here")
    _end_session(plan, done=False)
    try:
        deadline = time.monotonic() + 30
        while qmp.execute("query-migrate").get("status") in ("cancelling", "active"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        status = qmp.execute("query-status")
        if not status.get("running") and status.get("status") in ("postmigrate", "paused"):
            qmp.execute("cont")
    except (QMPError, KvmrunError):
        pass


def _close_tunnel(plan: Plan) -> None:
    if plan.tunnel is not None:
        if plan.tunnel.poll() is None:
            plan.tunnel.terminate()
            try:
                plan.tunnel.wait(10)
            except subprocess.TimeoutExpired:
                plan.tunnel.kill()
                plan.tunnel.wait()
        plan.tunnel = None
    for sock in (plan.guest.paths.migrate_out, plan.guest.paths.nbd_out):
        files.unlink(sock)


def _finish_source(plan: Plan, qmp: QMPClient, note) -> None:
    """The guest runs there: record "migrated to HOST" here and end QEMU."""
    _close_tunnel(plan)
    guest = plan.guest
    guest.set_request("migrate", str(plan.host))
    supervisor = guest.supervisor_pid(guest.read_state() or {})
    try:
        pidfd = open_pidfd(supervisor) if supervisor else None
    except GuestError:
        pidfd = None
    try:
        qmp.execute("quit")
    except (QMPError, KvmrunError):
        pass                                    # quit may end in EOF: that is success
    if pidfd is not None:                       # it records the end once QEMU is gone
        wait_pidfd(pidfd, 30)
        os.close(pidfd)
    files.unlink(guest.paths.migration)
    note(f"{plan.name} runs on {plan.host} now")
