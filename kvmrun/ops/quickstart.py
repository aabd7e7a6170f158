"""Starting an unchanged profile again without compiling it (`kvmrun start PROFILE`).

A start that succeeds keeps what it decided (the launch record, the NIC list, the notes it
printed) in <cache dir>/launch/, with fingerprints of everything that decision read: the
profile and its `extends` chain, the disks whose format was detected, the files the profile
names, the QEMU binary, the host facts (euid, /dev/kvm, the KVM verdict, KVMRUN_ACCEL,
KVMRUN_QEMU_USER) and kvmrun's own code. When all of them are unchanged, `start` skips the interpreter's heavy
imports (typer, yaml, the profile model, the compiler, qemu-img) and the supervisor's own
interpreter start-up: it forks the supervisor from this light process. Everything else is as
in kvmrun.ops.launch: the guest's lock, the running/disks-in-use/forwarded-port checks, a
clean run directory, the ready pipe, and nothing left behind on failure. Any change, or a
profile with parts the quick path does not make (cloud-init seeds, ephemeral overlays,
disks made on first start, networks other than user), takes the full path.

Light: standard library, the ground floor, the guest wing and two light backends.
"""

from __future__ import annotations

import json
import os
import select
import time
from contextlib import ExitStack
from pathlib import Path
from collections.abc import Callable  # not typing: ~3 ms of every quick start

from kvmrun import files, paths
from kvmrun.files import sha256
from kvmrun.errors import GuestError, GuestTimeout, LaunchError
from kvmrun.guest import netrecord
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest, disks_in_use, lock_disks, prepare_run_dir
from kvmrun.qemu.kvmprobe import kvm_accessible, kvm_verdict_file

VERSION = 1
PACKAGE = Path(__file__).resolve().parents[1]
QCOW2_MAGIC = b"QFI\xfb"


def _stamp(path: str | Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _modules(package: str) -> list[str]:
    """kvmrun's .py files, walking only into Python packages (a folder with __init__.py):
    rglob also walked the web UI's node_modules, and cost the quick start ~15 ms."""
    found, todo = [], [package]
    while todo:
        folder = todo.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".py") and entry.is_file():
                    found.append(entry.path)
                elif entry.is_dir() and os.path.exists(os.path.join(entry.path, "__init__.py")):
                    todo.append(entry.path)
    return sorted(found)


def code_stamp() -> str:
    """Changes whenever any of kvmrun's modules does (an upgrade, an edit)."""
    digest = sha256()
    for path in _modules(str(PACKAGE)):
        digest.update(f"{path}:{_stamp(path)}".encode())
    return digest.hexdigest()


def host_stamp() -> dict:
    return {"euid": os.geteuid(), "accel": os.environ.get("KVMRUN_ACCEL"),
            "qemu_user": os.environ.get("KVMRUN_QEMU_USER"),
            "kvm": kvm_accessible(), "verdict": _stamp(kvm_verdict_file())}


def cache_path(profile_file: Path) -> Path:
    where = "\0".join([str(profile_file.resolve()), str(paths.run_dir()),
                       str(paths.data_dir()), str(os.geteuid())])
    return (paths.cache_dir() / "launch"
            / (sha256(where.encode()).hexdigest()[:32] + ".json"))


def save(profile_file: str, entry: dict) -> None:
    """Keep a successful start's decisions (kvmrun.ops.launch calls it). Best effort."""
    entry = {**entry, "version": VERSION, "code": code_stamp(), "host": host_stamp(),
             "files": {f: _stamp(f) for f in entry["files"]}}
    try:
        files.write_json(cache_path(Path(profile_file)), entry, 0o600, make_dirs=0o700)
    except OSError:
        pass


def load(profile_file: Path) -> dict | None:
    """The cached start of `profile_file`, if nothing it depends on changed."""
    entry = files.read_json(cache_path(profile_file))
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        return None
    if any(_stamp(f) != stamp for f, stamp in entry.get("files", {}).items()):
        return None
    if not all(os.path.exists(p) for p in entry.get("exist", [])):
        return None
    for disk, fmt in entry.get("formats", {}).items():      # formats qemu-img detected
        try:
            with open(disk, "rb") as f:
                if (f.read(4) == QCOW2_MAGIC) != (fmt == "qcow2"):
                    return None
        except OSError:
            return None
    if entry.get("host") != host_stamp() or entry.get("code") != code_stamp():
        return None
    return entry


def start(ref: str, note: Callable[[str], None]) -> tuple[dict, dict] | None:
    """The quick start of `ref`: (what kvmrun.ops.launch.start returns, the cache entry),
    or None when the full path must run."""
    found = paths.profile_file(ref)        # a missing file: the full path explains
    entry = load(found) if found is not None and found.is_file() else None
    if entry is None or paths.resume_path(entry["name"]).exists():   # -loadvm: the full path
        return None
    launch = LaunchRecord.from_json(entry["launch"])
    launch.run_id = os.urandom(16).hex()     # every start is a run of its own (not
                                             # uuid: it loads libuuid)
    guest = Guest(entry["name"])
    for line in entry.get("notes", []):
        note(line)
    prepare_run_dir()
    created = not guest.paths.dir.exists()
    with guest.lock() as lock_fd, ExitStack() as held:
        try:
            lock_disks(sorted(set(launch.disks) - set(launch.shared_disks)), held)
            _claim(guest, launch, entry)
            return _fork_and_wait(guest, launch, entry, lock_fd), entry
        except BaseException:
            if guest.qemu_pid() is None:
                from kvmrun.guest import ending
                ending.release(guest)
                guest.remove_dir() if created else guest.clear_runtime(keep_logs=False)
            raise


def _claim(guest: Guest, launch: LaunchRecord, entry: dict) -> None:
    name = guest.name
    if guest.qemu_pid() is not None:
        raise GuestError(f"{name} is already running (pid {guest.qemu_pid()})",
                         hint=f"see `kvmrun status {name}`")
    busy = disks_in_use(name, launch.disks, launch.shared_disks)
    if busy:
        path, other = next(iter(busy.items()))
        raise GuestError(f"disk {path} is in use by running guest {other!r}",
                         hint="stop that guest first, or give this one its own disk")
    if entry.get("forwards"):
        from kvmrun.net.ports import check_forward
        for where, fwd in entry["forwards"]:
            check_forward(where, name, fwd)
    netrecord.teardown(guest.paths)          # leftovers of a guest that ended uncleanly
    guest.begin_start()
    netrecord.write(guest.paths, {"nics": entry.get("nics", [])})
    launch.write(guest.paths.launch)
    guest.reserve_request()          # so a stop or kill needs no free space later


def _fork_and_wait(guest: Guest, launch: LaunchRecord, entry: dict, lock_fd: int) -> dict:
    import fcntl
    pid, rfd = fork_supervisor(guest)
    return wait_for_supervisor(
        rfd, reaper(pid), name=guest.name, argv=launch.argv,
        ready_console=launch.ready_console, ready_timeout=launch.ready_timeout,
        wait_ready=not entry.get("halted"), log=guest.paths.supervisor_log,
        unlock=lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN), result={"supervisor_pid": pid})


def fork_supervisor(guest: Guest) -> tuple[int, int]:
    """The guest's supervisor as a fork of this process (no second interpreter start-up
    before QEMU is spawned), in a session of its own, with only its ready pipe; once QEMU is
    spawned it hands over to a lean interpreter in its own place (kvmrun.guest.supervisor).
    Returns (its pid, the ready pipe's read end). The caller has no threads."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:                                   # the supervisor, in a new session
        code = 1
        try:
            os.setsid()
            _redirect(guest)
            os.closerange(3, wfd)                  # as Popen's close_fds: the guest's lock,
            os.closerange(wfd + 1, os.sysconf("SC_OPEN_MAX"))  # disk locks, the pipe end
            from kvmrun.guest.supervisor import Supervisor
            code = Supervisor(guest, wfd, foreground=False, handover=True).run()
        except BaseException:
            import traceback
            traceback.print_exc()          # into supervisor.log
        finally:
            os._exit(code)
    os.close(wfd)
    return pid, rfd


def reaper(pid: int) -> Callable[[], int]:
    """The exit code of child `pid`, waiting for it."""
    return lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _redirect(guest: Guest) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(guest.paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def wait_for_supervisor(rfd: int, reap: Callable[[], int], *, name: str, argv: list[str],
                        ready_console: str | None, ready_timeout: int, wait_ready: bool,
                        log: Path, unlock: Callable[[], None] = lambda: None,
                        result: dict | None = None) -> dict:
    """Read the supervisor's ready pipe until QMP is up (and the console matched, with
    `wait_ready`); `reap()` gives its exit code when it ended first."""
    result = {"name": name, **(result or {})}
    timeout = ready_timeout + 35
    with os.fdopen(rfd, "rb") as pipe:
        deadline = time.monotonic() + timeout
        while True:
            if not select.select([pipe], [], [], max(0, deadline - time.monotonic()))[0]:
                raise GuestTimeout(f"{name}: no word from the supervisor in {timeout}s")
            line = pipe.readline()
            if not line:
                when = "the guest was ready" if "pid" in result else "QEMU was up"
                raise LaunchError(f"the supervisor of {name} exited ({reap()}) before {when}",
                                  argv, files.read_text(log)[-4000:], said_by="supervisor")
            message = json.loads(line)
            event = message["event"]
            if event == "failed":
                reap()
                if message.get("helper_argv"):      # a helper (virtiofsd, swtpm), not QEMU
                    helper = message["helper_argv"]
                    raise LaunchError(f"{name} failed to start: {message['message']}",
                                      helper, message.get("stderr", ""),
                                      said_by=os.path.basename(helper[0]))
                raise LaunchError(f"QEMU failed to start: {message['message']}", argv,
                                  message.get("stderr", ""),
                                  hint=launch_hint(message.get("stderr", "")))
            if event == "qmp":
                result["pid"] = message["pid"]
                unlock()
                if not wait_ready or not ready_console:
                    return result
            if event == "ready":
                return {**result, "ready": True}
            if event == "ready-timeout":
                raise GuestTimeout(
                    f"{name} is running but its console did not match {ready_console!r} "
                    f"within {ready_timeout}s",
                    hint=f"see `kvmrun logs {name}`; the guest was left running")


def launch_hint(stderr: str) -> str | None:
    if "Failed to get \"write\" lock" in stderr:
        return "another process uses this disk image"
    if "-cpu host" in stderr or "kvm" in stderr.lower():
        return ("on nested hosts KVM may not work; try accel: tcg, or a named CPU model "
                "instead of host (e.g. host,-arch-capabilities)")
    return None
