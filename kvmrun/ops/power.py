"""Power verbs on a running guest: stop (the graceful ladder, escalating only with
--force), kill, pause, resume, reset, raw QMP, and waiting for a state. Each works from the
run directory and QMP alone, so every command keeps working when a guest's supervisor died.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable  # not typing: ~3 ms of every plain stop

from kvmrun.errors import GuestError, GuestTimeout, QMPError, UsageError
from kvmrun.guest.qmp import query
from kvmrun.guest.rundir import Guest, State, require_running
from kvmrun.guest.shutdown import Ladder
from kvmrun.proc import open_pidfd, wait_pid, wait_pidfd

WAIT_STATES = ("running", "stopped", "ready")


def _identified_pidfd(guest: Guest) -> tuple[int, dict]:
    pid, state = require_running(guest)
    pidfd = open_pidfd(pid)
    if guest.qemu_pid(state) != pid:          # re-check after opening: no race with reuse
        os.close(pidfd)
        raise GuestError(f"{guest.name} is not running")
    return pidfd, state


def _cli_qmp(guest: Guest) -> Callable[[str], None]:
    def send(command: str) -> None:
        try:
            query(guest.paths.qmp_cli, command, timeout=3)
        except (QMPError, GuestError):
            pass
    return send


def _wait_supervisor(guest: Guest, state: dict, timeout: float = 10.0) -> bool:
    """Give a live supervisor the moment it needs to record the end (its exit comes right
    after its state write); False when there was none."""
    pid = guest.supervisor_pid(state)
    if pid is None:
        return False
    wait_pid(pid, timeout)
    return True


def _after_exit(guest: Guest, state: dict, ended: dict) -> None:
    """QEMU has exited: wait for its supervisor to record the end, or record it here when
    the supervisor is gone."""
    if _wait_supervisor(guest, state):
        return
    final = guest.read_state() or state
    if final.get("ended"):
        return
    from kvmrun.guest import ending     # (cgroup, helpers, spawn: ~1 ms of every plain stop)
    ending.record_end(guest, final, {**ended, "note": "recorded by the CLI: the guest's "
                                                      "supervisor was not running"})


def stop(guest: Guest, timeout: float | None = None, force: bool = False,
         progress: Callable[[str, str], None] = lambda s, m: None) -> dict:
    """Graceful shutdown with the profile's method; escalate only with force."""
    pidfd, state = _identified_pidfd(guest)
    try:
        launch = guest.read_launch()
        timeout = float(timeout if timeout is not None else launch.shutdown_timeout)
        guest.try_request("stop", "kvmrun stop")
        recorded: list[str] = []

        def record_stage(stage: str, message: str) -> None:
            # The supervisor reads request.json the moment QEMU exits, so each stage is
            # written down before it is tried (writing it afterwards races the supervisor,
            # and would re-create the file after it cleaned up).
            if stage not in recorded:
                recorded.append(stage)
                guest.try_request("stop", "kvmrun stop", stage)
            progress(stage, message)

        ladder = Ladder(pidfd, _cli_qmp(guest), method=launch.shutdown_method,
                        console_sock=str(guest.paths.console), qga_sock=str(guest.paths.qga),
                        command=launch.shutdown_command,
                        progress=record_stage)
        try:
            stage = ladder.run(timeout, force)
        except GuestTimeout:
            guest.clear_request()
            raise
    finally:
        os.close(pidfd)
    _after_exit(guest, state, {"reason": "stopped", "by": "kvmrun stop", "stage": stage,
                               "detail": f"stopped by kvmrun stop ({stage})"})
    final, recorded = guest.live_state()
    if final is State.CRASHED:          # the supervisor saw how QEMU really exited
        ended = recorded.get("ended") or {}
        raise GuestError(f"{guest.name} crashed while it was being stopped: "
                         f"{ended.get('detail', 'QEMU died')}",
                         hint=f"see `kvmrun status {guest.name}` and `kvmrun logs {guest.name}`")
    return {"name": guest.name, "stage": stage, "state": final,
            "method": launch.shutdown_method}


def kill(guest: Guest) -> dict:
    """Hard power-off now: QMP quit, SIGKILL if QMP does not end it quickly."""
    pidfd, state = _identified_pidfd(guest)
    try:
        guest.try_request("kill", "kvmrun kill")
        stage = "quit"
        try:
            query(guest.paths.qmp_cli, "quit", timeout=2)
        except (QMPError, GuestError):
            pass
        if not wait_pidfd(pidfd, 3):
            stage = "sigkill"
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_pidfd(pidfd, 30)
    finally:
        os.close(pidfd)
    _after_exit(guest, state, {"reason": "killed", "by": "kvmrun kill",
                               "detail": "powered off hard by kvmrun kill"})
    return {"name": guest.name, "stage": stage}


def qmp_command(guest: Guest, command: str, arguments: dict | None = None,
                timeout: float = 10.0) -> object:
    require_running(guest)
    return query(guest.paths.qmp_cli, command, arguments, timeout=timeout)


def screendump(guest: Guest, path, fmt: str = "png", timeout: float = 30.0) -> None:
    """QMP screendump into `path`, handed to QEMU as a descriptor (`add-fd`, then the file
    name /dev/fdset/N): a QEMU that dropped to another user could not open a path of ours."""
    from kvmrun.guest.qmp import QMPClient
    require_running(guest)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with QMPClient(guest.paths.qmp_cli, timeout=timeout) as qmp:
            fdset = qmp.execute("add-fd", {}, fds=[fd])["fdset-id"]
            try:
                qmp.execute("screendump", {"filename": f"/dev/fdset/{fdset}", "format": fmt})
            finally:
                qmp.execute("remove-fd", {"fdset-id": fdset})
    finally:
        os.close(fd)


def pause(guest: Guest) -> None:
    qmp_command(guest, "stop")


def resume(guest: Guest) -> None:
    qmp_command(guest, "cont")


def reset(guest: Guest, settle: float = 5.0) -> None:
    """Hard reset. A guest that counts as ready when its console prints a pattern is not
    ready after a reset until it prints it again: return once its supervisor has recorded
    that (so `kvmrun wait --for ready` right after waits for the new boot)."""
    qmp_command(guest, "system_reset")
    launch = guest.launch_or_none()
    if launch is None or not launch.ready_console:
        return
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and (guest.read_state() or {}).get("ready"):
        if guest.supervisor_pid() is None:
            return                         # nobody will record it
        select.select([], [], [], 0.02)


def wait_for(guest: Guest, what: str, timeout: float) -> None:
    if what not in WAIT_STATES:
        raise UsageError(f"--for {what!r}: expected running, stopped or ready")
    deadline = time.monotonic() + timeout
    if what == "stopped":
        state_name, state = guest.live_state()
        pid = guest.qemu_pid(state)
        if pid is None:
            return
        if not wait_pid(pid, timeout):
            raise GuestTimeout(f"{guest.name} still running after {timeout:g}s")
        _wait_supervisor(guest, state)
        return
    while time.monotonic() < deadline:
        state_name, state = guest.live_state()
        if what == "running" and state_name in (State.RUNNING, State.PAUSED):
            return
        if what == "ready" and state.get("ready") and guest.qemu_pid(state):
            return
        select.select([], [], [], 0.05)
    raise GuestTimeout(f"{guest.name} not {what} after {timeout:g}s")
