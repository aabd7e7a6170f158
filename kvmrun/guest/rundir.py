"""A guest's run directory: layout, lock, atomic state file, identity-checked liveness.

    <run_dir>/<name>/           mode 0700
        lock                    flock held while a start or stop changes the guest
        launch.json             what the supervisor runs (argv, settings), written by start
        state.json              the guest's state, written atomically (by the supervisor)
        events.jsonl            QMP events, one JSON object a line
        request.json            what a CLI asked for (stop/kill), so the end is attributed
        qemu.pid                QEMU's -pidfile (QEMU holds a lock on it while it lives)
        qemu.log                QEMU's own stdout/stderr
        serial.log              the serial console
        overlay-diskN.qcow2     the throwaway overlay of ephemeral disk N (gone when it ends)
        cidata.iso              the cloud-init NoCloud seed (+ cidata.sha256 of its inputs)
        qmp.sock qmp-cli.sock console.sock [qga.sock vnc.sock]   mode 0600

While a guest runs, everything is there. When it has stopped, the sockets, pidfile and
request are removed and state.json, events.jsonl, qemu.log and serial.log stay, so `status`
can say how it ended; the next start of the same name clears them.

This module must stay light: the supervisor imports it (no yaml, typer or psutil).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvmrun.errors import GuestError, GuestTimeout
from kvmrun.paths import RunPaths, run_dir

# lifecycle states (state.json "state")
STARTING, RUNNING, PAUSED, SHUTTING_DOWN, STOPPED, CRASHED = (
    "starting", "running", "paused", "shutting-down", "stopped", "crashed")
LIVE_STATES = (STARTING, RUNNING, PAUSED, SHUTTING_DOWN)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_starttime(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def proc_exited(pid: int) -> bool:
    """True for a zombie: it has exited and only waits for its parent to reap it (after a
    supervisor is killed, that parent is init, which may take a while or never do it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def identified(pid: int | None, starttime: int | None, marker: str | None = None) -> bool:
    """True only if `pid` is still the very process recorded, alive: same start time, not a
    zombie, and (when a marker is given) a command line containing it. A reused PID fails
    both."""
    if not pid or proc_starttime(pid) != starttime or starttime is None or proc_exited(pid):
        return False
    return marker is None or marker in proc_cmdline(pid)


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def flocked(path: Path, timeout: float = 30.0) -> Iterator[int]:
    """An exclusive flock on `path` (created 0600 with its directory 0700), held for the
    block; waits up to `timeout` seconds, then raises TimeoutError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(path) from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)


class Guest:
    """A handle on one guest's run directory; cheap to create, reads lazily."""

    def __init__(self, name: str, base: Path | None = None):
        self.name = name
        self.paths = RunPaths.for_guest(name, base)

    # -------------------------------------------------------- files
    def read_state(self) -> dict | None:
        try:
            return json.loads(self.paths.state.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def write_state(self, state: dict) -> None:
        atomic_write(self.paths.state, json.dumps(state, indent=1))

    def update_state(self, **changes) -> dict:
        state = self.read_state() or {}
        state.update(changes)
        self.write_state(state)
        return state

    def read_launch(self) -> dict:
        return json.loads((self.paths.dir / "launch.json").read_text())

    def append_event(self, event: dict) -> None:
        with open(self.paths.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict]:
        try:
            text = self.paths.events.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def set_request(self, action: str, by: str) -> None:
        atomic_write(self.paths.dir / "request.json",
                     json.dumps({"action": action, "by": by, "at": time.time()}))

    def request(self) -> dict | None:
        try:
            return json.loads((self.paths.dir / "request.json").read_text())
        except (OSError, ValueError):
            return None

    # -------------------------------------------------------- liveness
    def qemu_pid(self, state: dict | None = None) -> int | None:
        """QEMU's PID if (and only if) the recorded process is alive and is our QEMU."""
        state = state if state is not None else self.read_state()
        if not state or state.get("boot_id") != boot_id():
            return None
        pid = state.get("qemu_pid")
        if identified(pid, state.get("qemu_starttime"), str(self.paths.pidfile)):
            return pid
        return None

    def supervisor_pid(self, state: dict | None = None) -> int | None:
        state = state if state is not None else self.read_state()
        if not state or state.get("boot_id") != boot_id():
            return None
        pid = state.get("supervisor_pid")
        return pid if identified(pid, state.get("supervisor_starttime")) else None

    def live_state(self) -> tuple[str, dict]:
        """(state name, state dict) with the truth about liveness applied: a state file that
        says running while its QEMU is gone (crash, host reboot, PID reuse) reads as ended."""
        state = self.read_state()
        if state is None:
            return STOPPED, {}
        alive = self.qemu_pid(state) is not None
        recorded = state.get("state", STOPPED)
        if not alive:
            self.collect_orphans()
        if alive:
            if recorded not in LIVE_STATES:
                recorded = RUNNING
            if self.request() and self.request().get("action") == "stop":
                recorded = SHUTTING_DOWN
            return recorded, state
        if recorded in LIVE_STATES:
            ended = state.get("ended") or {
                "reason": "unknown",
                "detail": "QEMU is gone and its supervisor did not record why "
                          "(supervisor killed, or the host rebooted)"}
            return (CRASHED if ended.get("reason") in ("crashed", "unknown") else STOPPED,
                    {**state, "ended": ended})
        return recorded, state

    # -------------------------------------------------------- locking
    @contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[int]:
        """Exclusive flock on the guest's lock file; waits up to `timeout` seconds."""
        try:
            with flocked(self.paths.lock, timeout) as fd:
                yield fd
        except TimeoutError:
            raise GuestTimeout(f"{self.name}: another kvmrun command holds the guest's lock "
                               f"({self.paths.lock})") from None

    # -------------------------------------------------------- clean-up
    def clear_runtime(self, keep_logs: bool = True) -> None:
        """Remove sockets, pidfile and request (after the guest ended)."""
        for p in self.paths.sockets() + [self.paths.pidfile, self.paths.dir / "request.json"]:
            _unlink(p)
        if not keep_logs:
            for p in (self.paths.state, self.paths.events, self.paths.serial_log,
                      self.paths.dir / "qemu.log", self.paths.dir / "launch.json"):
                _unlink(p)
        for p in self.paths.dir.glob("overlay-disk*.qcow2"):   # ephemeral disks' writes
            _unlink(p)

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
                        _unlink(p)
        except (GuestTimeout, OSError):
            pass

    def remove_dir(self) -> None:
        """Remove the whole run directory (a failed start leaves nothing behind)."""
        self.clear_runtime(keep_logs=False)
        for leftover in self.paths.dir.glob("*"):
            _unlink(leftover)
        try:
            self.paths.dir.rmdir()
        except OSError:
            pass


def prepare_run_dir(base: Path | None = None) -> Path:
    base = base or run_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


def guest_names(base: Path | None = None) -> list[str]:
    base = base or run_dir()
    try:
        return sorted(p.name for p in base.iterdir() if (p / "state.json").exists())
    except FileNotFoundError:
        return []


def require_running(guest: Guest) -> tuple[int, dict]:
    state_name, state = guest.live_state()
    pid = guest.qemu_pid(state)
    if pid is None:
        raise GuestError(f"{guest.name} is not running (state: {state_name})",
                         hint="start it with `kvmrun start`")
    return pid, state
