"""How a guest ended, decided once, and the one end-of-guest clean-up.

`classify` (kvmrun.guest.exits) turns QEMU's exit status, the last SHUTDOWN event and what a
kvmrun command asked for into the `ended` record and the supervisor's exit code. `record_end` is the end of every
guest, whoever notices it (its supervisor; a CLI command when the supervisor is gone): the
final state record is written, then the sockets, pidfile, overlays and network go, even when
the write fails (a full disk must not keep a tap alive), and helpers a dead supervisor left
running (virtiofsd, swtpm) are ended.
"""

from __future__ import annotations

import time

from kvmrun.guest import cgroup, helpers, netrecord
from kvmrun.guest.rundir import CRASH_REASONS, Guest, State


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
        helpers.end_recorded(state.get("helpers"))
        release(guest)
    return state
