"""How a guest ended, decided once, and the one end-of-guest clean-up.

`classify` turns QEMU's exit status, the last SHUTDOWN event and what a kvmrun command asked
for into the `ended` record and the supervisor's exit code. `record_end` is the end of every
guest, whoever notices it (its supervisor; a CLI command when the supervisor is gone): the
final state record is written, then the sockets, pidfile, overlays and network go, even when
the write fails (a full disk must not keep a tap alive).
"""

from __future__ import annotations

import signal
import time

from kvmrun.guest import cgroup, netrecord
from kvmrun.guest.rundir import CRASH_REASONS, Guest, State
from kvmrun.guest.shutdown import HARD_STAGES

# exit codes of the supervisor (and so of `kvmrun run` and the systemd unit)
EXIT_CLEAN = 0           # the guest powered off, or was stopped gracefully on request
EXIT_LAUNCH = 7          # QEMU failed to start
EXIT_CRASHED = 8         # QEMU died of a signal or exited with an error
EXIT_PANICKED = 9        # the guest kernel panicked
EXIT_ESCALATED = 10      # a stop had to escalate (QMP quit, SIGTERM, SIGKILL)
EXIT_KILLED = 11         # hard power-off on request (`kvmrun kill`)


def classify(returncode: int, shutdown_reason: str | None, panicked: bool,
             request: dict) -> tuple[dict, int]:
    """Why the guest ended. Returns (ended record, supervisor exit code).

    How QEMU really exited comes first: a QEMU that died of a signal nobody in kvmrun sent
    crashed, even while a stop was under way (only a stop that reached its sigkill stage
    sent SIGKILL; a kill may send it too). So systemd's Restart=on-failure sees a crash
    during a stop as the crash it is."""
    action, by, stage = request.get("action"), request.get("by", "kvmrun"), request.get("stage")
    base = {"shutdown_reason": shutdown_reason}
    if panicked:
        return {**base, "reason": "panicked", "detail": "the guest kernel panicked"}, EXIT_PANICKED
    if action == "migrate" and returncode == 0:
        return {**base, "reason": "migrated", "to": by,
                "detail": f"migrated to {by}"}, EXIT_CLEAN
    if action == "kill":
        return {**base, "reason": "killed", "by": by,
                "detail": f"powered off hard by {by}"}, EXIT_KILLED
    ours = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}.get(stage or "")
    if returncode < 0 and -returncode != ours:
        sig = -returncode
        during = f" during {by}'s stop" if action == "stop" else ""
        return {**base, "reason": "crashed", "signal": sig,
                "detail": f"QEMU was killed by signal {sig} ({signal.Signals(sig).name})"
                          f"{during}"}, EXIT_CRASHED
    if action == "stop":
        if stage in HARD_STAGES:
            return {**base, "reason": "stopped", "by": by, "stage": stage,
                    "detail": f"stopped by {by}, escalated to {stage}"}, EXIT_ESCALATED
        return {**base, "reason": "stopped", "by": by, "stage": stage or "acpi",
                "detail": f"stopped by {by}: the guest powered off"}, EXIT_CLEAN
    if shutdown_reason == "guest-shutdown" and returncode == 0:
        return {**base, "reason": "guest-shutdown",
                "detail": "the guest powered itself off"}, EXIT_CLEAN
    if returncode < 0:
        sig = -returncode
        return {**base, "reason": "crashed", "signal": sig,
                "detail": f"QEMU was killed by signal {sig} ({signal.Signals(sig).name})"
                }, EXIT_CRASHED
    if returncode != 0:
        return {**base, "reason": "qemu-error",
                "detail": f"QEMU exited with status {returncode}"}, EXIT_CRASHED
    detail = {"host-qmp-quit": "QMP quit from outside kvmrun",
              "host-signal": "QEMU got a signal from outside kvmrun"}.get(
                  shutdown_reason or "", f"QEMU exited ({shutdown_reason or 'no reason given'})")
    return {**base, "reason": "stopped", "by": "outside", "detail": detail}, EXIT_CLEAN


def release(guest: Guest) -> None:
    """What a guest that has ended no longer needs: sockets, pidfile, request, overlays,
    taps and hub ports, its cgroup. Safe to call twice."""
    launch = guest.launch_or_none()
    leaf = (launch.cgroup or {}).get("leaf") if launch else None
    try:
        guest.clear_runtime()
    finally:
        netrecord.teardown(guest.paths)
        if leaf:
            cgroup.remove(leaf, wait=1.0)


def record_end(guest: Guest, state: dict, ended: dict, code: int | None = None) -> dict:
    """Write the final state (from `state`, the record so far) and release the guest."""
    ended = {**ended, "at": ended.get("at") or time.time()}
    final = State.CRASHED if ended.get("reason") in CRASH_REASONS else State.STOPPED
    state.update(state=final, ended=ended)
    if code is not None:
        state["supervisor_exit"] = code
    try:
        guest.write_state(state)
    finally:
        release(guest)
    return state
