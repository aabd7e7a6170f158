"""How a guest ended, from how its QEMU exited: the supervisor's exit codes and the one
classification (`classify`), used by the supervisor when it reaps QEMU, and by `status`
for a QEMU that ended while its supervisor was dead (`logged_cause`: the shutdown cause
QEMU wrote to its log, `-trace qemu_system_shutdown_request`, which the supervisor adds).

Standard library only.
"""

from __future__ import annotations

import re
import signal

from kvmrun.guest.shutdown import HARD_STAGES

# QEMU's trace event for a shutdown request, and its ShutdownCause numbers (qapi/run-state.json)
TRACE_ARGS = ["-trace", "qemu_system_shutdown_request"]
CAUSES = ("none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
          "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset")
_LOGGED = (rb"^qemu_system_shutdown_request reason=(\d+)$|"     # compiled at its first use
            rb"terminating on signal \d+")                      # (re's cache), not import


def logged_cause(log: bytes) -> str | None:
    """The last shutdown cause in QEMU's log, or None (QEMU crashed or was killed: it
    wrote none). 'terminating on signal N' is QEMU's own line for SIGTERM/SIGINT/SIGHUP."""
    found = list(re.finditer(_LOGGED, log, re.MULTILINE))
    if not found:
        return None
    number = found[-1].group(1)
    if number is None:
        return "host-signal"
    n = int(number)
    return CAUSES[n] if n < len(CAUSES) else f"cause {n}"


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
