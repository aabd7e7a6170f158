"""A VM's snapshots by name: which disks a snapshot of NAME covers, and whether it goes
through the running guest's monitor (kvmrun.storage.snapshots does the work). `kvmrun
snapshot …` and the web UI's snapshot buttons both call these."""

from __future__ import annotations

import time

from kvmrun.errors import KvmrunError
from kvmrun.guest.rundir import Guest
from kvmrun.ops import defined
from kvmrun.paths import valid_name
from kvmrun.storage import snapshots

Disks = list[tuple[str, bool]]          # [(path, skip: read-only, shared or ephemeral)]


def _running_disks(guest: Guest) -> Disks:
    """A running guest's disks as it was launched: an ephemeral disk's writes are in its
    overlay, so the overlay is what a snapshot covers."""
    launch = guest.read_launch()
    shared = set(launch.shared_disks)
    eph = set(launch.ephemeral_disks)
    return [(str(guest.paths.overlay(i)), False) if i in eph else (p, p in shared)
            for i, p in enumerate(launch.disks)]


def target(name: str) -> tuple[Disks, Guest | None]:
    """(disks, the running guest or None) for a guest name, a defined VM or a profile.

    A running guest: the disks it was launched with. Else the defined VM or profile file
    `name` (its guest, if that one runs under the profile's name); else the disks of the
    guest's last run."""
    guest = Guest(name) if valid_name(name) else None
    if guest is not None and guest.qemu_pid() is not None:
        return _running_disks(guest), guest
    try:
        prof = defined.resolve(name)
    except KvmrunError:
        launch = guest.launch_or_none() if guest is not None else None
        if launch is not None:
            shared = set(launch.shared_disks)
            return [(p, p in shared) for p in launch.disks], None
        raise
    running = Guest(prof.name)
    if running.qemu_pid() is not None:
        return _running_disks(running), running
    return [(d.path, d.readonly or d.ephemeral) for d in prof.disks], None


def default_name() -> str:
    return time.strftime("snap-%Y%m%d-%H%M%S")


def snapshot(name: str, action: str, snap: str | None = None) -> list[dict]:
    """`kvmrun snapshot create|list|revert|delete NAME [SNAP]` (create without SNAP:
    snap-DATE-TIME): savevm/loadvm/delvm while the guest runs, qemu-img while it is
    stopped. Returns the snapshots afterwards."""
    if action == "create" and not snap:
        snap = default_name()
    disks, guest = target(name)
    return snapshots.snapshot(action, disks, snap, guest)
