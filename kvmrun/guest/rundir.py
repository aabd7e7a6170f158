"""A guest's run directory: layout, lock, state record, identity-checked liveness.

    <run_dir>/<name>/           mode 0700
        lock                    flock held while a start or stop changes the guest
        launch.json             what the supervisor runs (kvmrun.guest.launch), by start
        state.json              the guest's state, written atomically (by the supervisor)
        events.jsonl            QMP events, one JSON object a line
        request.json            what a CLI asked for (stop/kill), so the end is attributed
        network.json            what network setup made for the NICs (taps, hub ports)
        monitor.json            which command holds qmp-cli.sock for long (export --live)
        qemu.pid                QEMU's -pidfile (QEMU holds a lock on it while it lives)
        qemu.log                QEMU's own stdout/stderr
        serial.log              the serial console (rotated at serial_log_max)
        serial.log.1            the part before the last rotation
        supervisor.log          what the supervisor said (its stderr) during this start
        supervisor.log.1        the same of the start before (each start moves it here)
        overlay-diskN.qcow2     the throwaway overlay of ephemeral disk N (gone when it ends)
        cidata.iso              the cloud-init NoCloud seed (+ cidata.sha256 of its inputs)
        helper-NAME.sock .log   a helper's socket and log (virtiofsd0, swtpm: guest.helpers)
        qmp.sock qmp-cli.sock console.sock [qga.sock vnc.sock]   mode 0600

While a guest runs, everything is there. When it has stopped, the sockets, pidfile and
request are removed and state.json, events.jsonl, qemu.log and serial.log stay, so `status`
can say how it ended; the next start of the same name clears them.

Standard library and kvmrun's ground floor only: the supervisor imports it.
"""

from __future__ import annotations

import enum
import fcntl
import errno
import json
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from collections.abc import Iterator  # not typing: ~1 MiB in every supervisor

from kvmrun import files, proc
from kvmrun.errors import GuestError, GuestTimeout, NotPrivate
from kvmrun.guest.launch import LaunchRecord
from kvmrun.paths import RunPaths, run_dir

STATE_VERSION = 1


class State(str, enum.Enum):
    """A guest's lifecycle state (state.json "state"; JSON keeps the plain string)."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    STOPPED = "stopped"
    CRASHED = "crashed"
    NOT_RESPONDING = "not-responding"    # QEMU alive but stopped by a signal or QMP mute
    UNREADABLE = "unreadable"            # state.json is corrupt and no QEMU holds the name

    def __str__(self) -> str:
        return self.value

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


LIVE_STATES = (State.STARTING, State.RUNNING, State.PAUSED, State.SHUTTING_DOWN,
               State.NOT_RESPONDING)
UNREADABLE = {"record": "unreadable"}     # what read_state gives for a corrupt state.json
CRASH_REASONS = ("crashed", "qemu-error", "panicked", "failed-to-start")


def _state(value: object) -> State:
    try:
        return State(value)
    except ValueError:
        return State.STOPPED


class Guest:
    """A handle on one guest's run directory; cheap to create, reads lazily."""

    def __init__(self, name: str, base: Path | None = None):
        self.name = name
        self.paths = RunPaths.for_guest(name, base)
        trusted(self.paths.dir.parent, create=False)
        trusted(self.paths.dir, create=False)

    # -------------------------------------------------------- records
    def read_state(self) -> dict | None:
        """The state record; None when there is none, UNREADABLE (a copy) when it does not
        parse as an object (truncated, `[]`): liveness then comes from the pidfile."""
        try:
            state = json.loads(self.paths.state.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return dict(UNREADABLE)
        return state if isinstance(state, dict) else dict(UNREADABLE)

    def write_state(self, state: dict) -> None:
        """Atomically; on a full disk, in place over the old record (which keeps its
        blocks), so the end of a guest is still recorded."""
        text = json.dumps({**state, "version": STATE_VERSION}, indent=1)
        try:
            files.atomic_write(self.paths.state, text, durable=False)   # void after a reboot
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.paths.state.exists():
                raise
            files.overwrite(self.paths.state, text)

    def read_launch(self) -> LaunchRecord:
        return LaunchRecord.read(self.paths.launch)

    def launch_or_none(self) -> LaunchRecord | None:
        try:
            return self.read_launch()
        except (OSError, ValueError):
            return None

    def append_event(self, event: dict) -> None:
        with open(self.paths.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    def set_request(self, action: str, by: str, stage: str | None = None) -> None:
        """Record what a command asked for (stop, kill) and who asks: a request expires
        with its requester, so a stop that was killed is not credited later."""
        me = os.getpid()
        files.write_reserved(self.paths.request, json.dumps({
            "action": action, "by": by, "at": time.time(), "stage": stage,
            "pid": me, "starttime": proc.starttime(me)}))

    def clear_request(self) -> None:
        """Withdraw a request (a stop that timed out), keeping the reserved page."""
        if self.paths.request.exists():
            files.write_reserved(self.paths.request, "")

    def try_request(self, action: str, by: str, stage: str | None = None) -> bool:
        """set_request, but a run directory that cannot take it never stops the action
        (the end is then attributed from QEMU's exit alone)."""
        try:
            self.set_request(action, by, stage)
            return True
        except OSError:
            return False

    def reserve_request(self) -> None:
        """Made at launch: request.json as a reserved page, so a stop or kill can record
        itself on a full run directory."""
        files.reserve(self.paths.request, durable=False)     # void after a reboot

    def request(self) -> dict | None:
        found = files.read_reserved(self.paths.request)
        if not isinstance(found, dict):
            return None
        if found.get("pid") and not proc.identified(found["pid"], found.get("starttime")):
            return None                      # its requester is gone: the request expired
        return found

    # -------------------------------------------------------- liveness
    def qemu_pid(self, state: dict | None = None) -> int | None:
        """QEMU's PID if (and only if) a live process is our QEMU: the one state.json
        records (same start time, our -pidfile in its command line), or, when the record
        is missing or corrupt, the process that holds the lock on our pidfile."""
        state = state if state is not None else self.read_state()
        if state and state.get("boot_id") == proc.boot_id():
            pid = state.get("qemu_pid")
            if proc.identified(pid, state.get("qemu_starttime"), str(self.paths.pidfile)):
                return pid
        if not state or state.get("record") == "unreadable" or not state.get("qemu_pid"):
            return self.pidfile_holder()
        return None

    def pidfile_holder(self) -> int | None:
        """The PID in qemu.pid if QEMU still holds its lock on that file (QEMU locks its
        -pidfile for its whole life) and the process names the file: liveness without
        state.json."""
        try:
            fd = os.open(self.paths.pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not files.write_locked(fd):
                return None
            text = os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if not (text.isascii() and text.isdigit()):
            return None
        pid = int(text)
        return pid if proc.identified(pid, proc.starttime(pid), str(self.paths.pidfile)) \
            else None

    def responding(self, pid: int) -> bool:
        """False for a QEMU stopped by a signal (SIGSTOP, a debugger): its monitor cannot
        answer, so `status` says so at once instead of waiting on QMP."""
        fields = proc.stat_fields(pid)
        return bool(fields) and fields[0] not in ("T", "t")

    def supervisor_pid(self, state: dict | None = None) -> int | None:
        state = state if state is not None else self.read_state()
        if not state or state.get("boot_id") != proc.boot_id():
            return None
        pid = state.get("supervisor_pid")
        return pid if proc.identified(pid, state.get("supervisor_starttime")) else None

    def live_state(self) -> tuple[State, dict]:
        """(state, state dict) with the truth about liveness applied: a state file that says
        running while its QEMU is gone (crash, host reboot, PID reuse) reads as ended."""
        state = self.read_state()
        if state is None:
            pid = self.pidfile_holder()
            return (State.RUNNING, {"record": "missing", "qemu_pid": pid}) if pid \
                else (State.STOPPED, {})
        pid = self.qemu_pid(state)
        alive = pid is not None
        if state.get("record") == "unreadable":
            return (State.RUNNING if alive else State.UNREADABLE), {**state, "qemu_pid": pid}
        recorded = _state(state.get("state", State.STOPPED))
        if alive and not self.responding(pid):
            return State.NOT_RESPONDING, state
        if alive:
            if not recorded.live:
                recorded = State.RUNNING
            request = self.request()
            if request and request.get("action") == "stop":
                recorded = State.SHUTTING_DOWN
            return recorded, state
        self.collect_orphans()
        if recorded.live:
            ended = state.get("ended") or self.unrecorded_end()
            crashed = ended.get("reason") in CRASH_REASONS + ("unknown",)
            return (State.CRASHED if crashed else State.STOPPED), {**state, "ended": ended}
        return recorded, state

    def unrecorded_end(self) -> dict:
        """How a QEMU ended that no supervisor saw end: the shutdown cause QEMU logged
        (a power-off from inside, a QMP quit, a signal it handled), else unknown, which
        reads as a crash (QEMU killed or crashed logs none; so does a host reboot)."""
        from kvmrun.guest import exits        # re and signal: not on a quick start's way
        try:
            with open(self.paths.qemu_log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
                cause = exits.logged_cause(f.read())
        except OSError:
            cause = None
        if cause is None:
            return {"reason": "unknown",
                    "detail": "QEMU is gone and its supervisor did not record why "
                              "(supervisor killed, or the host rebooted)"}
        ended, _ = exits.classify(0, cause, cause == "guest-panic", self.request() or {})
        return {**ended, "note": "from QEMU's log: its supervisor was not running"}

    # -------------------------------------------------------- locking
    @contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[int]:
        """Exclusive flock on the guest's lock file; waits up to `timeout` seconds."""
        try:
            with files.flocked(self.paths.lock, timeout) as fd:
                yield fd
        except TimeoutError:
            raise GuestTimeout(f"{self.name}: another kvmrun command holds the guest's lock "
                               f"({self.paths.lock})") from None

    # -------------------------------------------------------- clean-up
    def clear_runtime(self, keep_logs: bool = True) -> None:
        """Remove sockets, pidfile, request and ephemeral overlays (after the guest ended)."""
        for p in self.paths.sockets() + self.paths.helper_files(".sock") + [
                self.paths.pidfile, self.paths.request, self.paths.monitor_hold]:
            files.unlink(p)
        if not keep_logs:
            for p in (self.paths.state, self.paths.events, self.paths.serial_log,
                      self.paths.serial_log_old,
                      self.paths.qemu_log, self.paths.launch, *self.paths.helper_files(".log")):
                files.unlink(p)
        for p in self.paths.dir.glob("overlay-disk*.qcow2"):   # ephemeral disks' writes
            files.unlink(p)

    def begin_start(self) -> None:
        """What a start clears before it claims the guest: the last run's runtime files
        and logs; the last supervisor.log becomes supervisor.log.1, so it never grows
        across starts and a failed start's log is there until the next start but one."""
        self.clear_runtime(keep_logs=False)
        try:
            os.replace(self.paths.supervisor_log, self.paths.supervisor_log_old)
        except OSError:
            pass                          # none yet (or it cannot move: it appends then)

    def collect_orphans(self) -> None:
        """Remove the throwaway overlays of a guest that ended without its supervisor
        cleaning up (crash, kill -9, host reboot). Only under the guest's lock, so an
        overlay a start has just made for its QEMU is never taken."""
        if not any(self.paths.dir.glob("overlay-disk*.qcow2")):
            return
        try:
            with self.lock(timeout=0):
                if self.qemu_pid() is None:
                    for p in self.paths.dir.glob("overlay-disk*.qcow2"):
                        files.unlink(p)
        except (GuestTimeout, OSError):
            pass

    def remove_dir(self) -> None:
        """Remove the whole run directory (a failed start leaves nothing behind)."""
        self.clear_runtime(keep_logs=False)
        for leftover in self.paths.dir.glob("*"):
            files.unlink(leftover)
        try:
            self.paths.dir.rmdir()
        except OSError:
            pass


def trusted(directory: Path, create: bool = True) -> Path:
    """A run directory only this user can enter, or a HostError that says why not:
    sockets, logs and records are only made and read in such directories (issue 12: a
    /tmp/kvmrun-UID planted by another user must not receive a guest's console)."""
    try:
        return files.private_dir(directory, create)
    except NotPrivate as err:
        raise NotPrivate(f"refusing to use {directory}: {err.message}",
                         hint="remove it (it may be another user's trap), or choose another "
                              "run directory with --run-dir or KVMRUN_RUN_DIR") from None


def prepare_run_dir(base: Path | None = None) -> Path:
    return trusted(base or run_dir())


def guest_names(base: Path | None = None) -> list[str]:
    base = base or run_dir()
    try:
        return sorted(p.name for p in base.iterdir() if (p / "state.json").exists())
    except FileNotFoundError:
        return []


def live_launches(base: Path | None = None, skip: str | None = None
                  ) -> Iterator[tuple[str, LaunchRecord]]:
    """(name, launch record) of every running guest (the one scan for disks in use,
    forwarded ports, …); `skip` leaves one name out."""
    for name in guest_names(base):
        if name == skip:
            continue
        guest = Guest(name, base)
        if guest.qemu_pid() is None:
            continue
        launch = guest.launch_or_none()
        if launch is not None:
            yield name, launch


def _real(path: str) -> str:
    return path if path.startswith("nfs://") else os.path.realpath(path)


def disks_in_use(name: str, disks: list[str], shared: list[str],
                 base: Path | None = None) -> dict[str, str]:
    """Disk paths of guest `name` that another running guest already has open: path ->
    guest. Disks only read (`shared`: read-only ones, the bases of ephemeral disks) may be
    shared with guests that only read them too."""
    mine_read = {os.path.realpath(p) for p in shared}
    mine = {os.path.realpath(p) for p in disks} - mine_read
    busy = {}
    for other, launch in live_launches(base, skip=name):
        theirs_read = {os.path.realpath(p) for p in launch.shared_disks}
        for path in launch.disks:
            real = os.path.realpath(path)
            if real in mine or (real in mine_read and real not in theirs_read):
                busy[path] = other
    return busy


def lock_disks(writable: list[str], held: ExitStack) -> None:
    """An flock per disk image a guest writes, held (in `held`) until its QEMU is up (then
    QEMU's own image lock guards the file, and the launch record names it for
    `disks_in_use`): two guests started at once with one disk cannot both pass the
    in-use check."""
    locks = trusted(prepare_run_dir() / ".disks")
    for disk in writable:
        real = os.path.realpath(disk)
        path = locks / (files.sha256(os.fsencode(real)).hexdigest()[:24] + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        held.callback(os.close, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GuestError(f"disk {disk} is being started by another guest",
                             hint="give each guest its own disk (or mark it readonly)") \
                from None


def guest_using(path: str, base: Path | None = None) -> tuple[str, int, bool] | None:
    """(guest name, disk index, ephemeral) of a running kvmrun guest that has `path` open
    (a file, or the nfs:// URL of a volume QEMU opens itself, compared as it is)."""
    real = _real(path)
    for name, launch in live_launches(base):
        for i, used in enumerate(launch.disks):
            if _real(used) == real:
                return name, i, i in launch.ephemeral_disks
    return None


def require_running(guest: Guest) -> tuple[int, dict]:
    state_name, state = guest.live_state()
    pid = guest.qemu_pid(state)
    if pid is None:
        raise GuestError(f"{guest.name} is not running (state: {state_name})",
                         hint="start it with `kvmrun start`")
    return pid, state
