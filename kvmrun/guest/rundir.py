"""A guest's run directory: layout, lock, state record, identity-checked liveness.

    <run_dir>/<name>/           mode 0700
        lock                    flock held while a start or stop changes the guest
        launch.json             what the supervisor runs (kvmrun.guest.launch), by start
        state.json              the guest's state, written atomically (by the supervisor)
        events.jsonl            QMP events, one JSON object a line
        request.json            what a CLI asked for (stop/kill), so the end is attributed
        network.json            what network setup made for the NICs (taps, hub ports)
        qemu.pid                QEMU's -pidfile (QEMU holds a lock on it while it lives)
        qemu.log                QEMU's own stdout/stderr
        serial.log              the serial console
        overlay-diskN.qcow2     the throwaway overlay of ephemeral disk N (gone when it ends)
        cidata.iso              the cloud-init NoCloud seed (+ cidata.sha256 of its inputs)
        qmp.sock qmp-cli.sock console.sock [qga.sock vnc.sock]   mode 0600

While a guest runs, everything is there. When it has stopped, the sockets, pidfile and
request are removed and state.json, events.jsonl, qemu.log and serial.log stay, so `status`
can say how it ended; the next start of the same name clears them.

Standard library and kvmrun's ground floor only: the supervisor imports it.
"""

from __future__ import annotations

import enum
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvmrun import files, proc
from kvmrun.errors import GuestError, GuestTimeout
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

    def __str__(self) -> str:
        return self.value

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


LIVE_STATES = (State.STARTING, State.RUNNING, State.PAUSED, State.SHUTTING_DOWN)
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

    # -------------------------------------------------------- records
    def read_state(self) -> dict | None:
        state = files.read_json(self.paths.state)
        return state if isinstance(state, dict) else None

    def write_state(self, state: dict) -> None:
        files.write_json(self.paths.state, {**state, "version": STATE_VERSION})

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
        files.write_json(self.paths.request, {
            "action": action, "by": by, "at": time.time(), "stage": stage,
            "pid": me, "starttime": proc.starttime(me)})

    def request(self) -> dict | None:
        found = files.read_json(self.paths.request)
        if not isinstance(found, dict):
            return None
        if found.get("pid") and not proc.identified(found["pid"], found.get("starttime")):
            return None                      # its requester is gone: the request expired
        return found

    # -------------------------------------------------------- liveness
    def qemu_pid(self, state: dict | None = None) -> int | None:
        """QEMU's PID if (and only if) the recorded process is alive and is our QEMU."""
        state = state if state is not None else self.read_state()
        if not state or state.get("boot_id") != proc.boot_id():
            return None
        pid = state.get("qemu_pid")
        if proc.identified(pid, state.get("qemu_starttime"), str(self.paths.pidfile)):
            return pid
        return None

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
            return State.STOPPED, {}
        alive = self.qemu_pid(state) is not None
        recorded = _state(state.get("state", State.STOPPED))
        if alive:
            if not recorded.live:
                recorded = State.RUNNING
            request = self.request()
            if request and request.get("action") == "stop":
                recorded = State.SHUTTING_DOWN
            return recorded, state
        self.collect_orphans()
        if recorded.live:
            ended = state.get("ended") or {
                "reason": "unknown",
                "detail": "QEMU is gone and its supervisor did not record why "
                          "(supervisor killed, or the host rebooted)"}
            crashed = ended.get("reason") in CRASH_REASONS + ("unknown",)
            return (State.CRASHED if crashed else State.STOPPED), {**state, "ended": ended}
        return recorded, state

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
        for p in self.paths.sockets() + [self.paths.pidfile, self.paths.request]:
            files.unlink(p)
        if not keep_logs:
            for p in (self.paths.state, self.paths.events, self.paths.serial_log,
                      self.paths.qemu_log, self.paths.launch):
                files.unlink(p)
        for p in self.paths.dir.glob("overlay-disk*.qcow2"):   # ephemeral disks' writes
            files.unlink(p)

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
