"""A VM's snapshots by name: which disks a snapshot of NAME covers, whether it goes through
the running guest's monitor (kvmrun.storage.snapshots does the work), the guest's file systems
frozen around a live one, and the RAM state of a snapshot reverted while the VM is stopped.
`kvmrun snapshot …` and the web UI's snapshot buttons both call these.

A live snapshot (savevm, with the VM state) first freezes the guest's file systems through
its agent (guest-fsfreeze-freeze; kvmrun.ops.agent.frozen) and thaws them after, also when
savevm fails: the disks then hold what the guest's file systems had committed, so booting
them afresh is as safe as after a clean unmount. Without an agent that answers, the snapshot
is crash-consistent (`frozen: false`, with a one-line note). The saved RAM state has the file
systems frozen, so every loadvm of it is followed by a thaw when the agent says "frozen".

A guest with a device whose state QEMU cannot save (a virtiofs share) cannot savevm: a
disk-only live snapshot (`disk_only`: the disks' internal snapshots in one QMP transaction,
inside the same freeze and thaw) is what it can take. It has no RAM state: reverting it
needs the VM stopped, and the next start boots from its disks.

Reverting a snapshot that has RAM state while the VM is stopped reverts its disks at once
(qemu-img snapshot -a) and, unless `disk_only`, makes the next start load that RAM state
(`-loadvm SNAP`): the guest goes on from the moment of the snapshot instead of booting. It is
one-shot: the start that finds it consumes it, whether QEMU then loads the state or not (a
profile changed since the snapshot, e.g. memory or devices, makes QEMU refuse it: that start
fails, saying so, and the next one boots from the disk state). The pending state is
`<data_dir>/resume/NAME.json` (kvmrun.paths.resume_path); a VM with an ephemeral disk cannot resume (that disk's state
is gone), nor can one whose disks no longer carry the snapshot.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvmrun import files, paths
from kvmrun.errors import KvmrunError
from kvmrun.guest.rundir import Guest
from kvmrun.ops import agent, defined
from kvmrun.paths import valid_name
from kvmrun.storage import images, snapshots

Disks = list[tuple[str, bool]]          # [(path, skip: read-only, shared or ephemeral)]


def _running_disks(guest: Guest) -> Disks:
    """A running guest's disks as it was launched: an ephemeral disk's writes are in its
    overlay, so the overlay is what a snapshot covers."""
    launch = guest.read_launch()
    shared = set(launch.shared_disks)
    eph = set(launch.ephemeral_disks)
    return [(str(guest.paths.overlay(i)), False) if i in eph else (p, p in shared)
            for i, p in enumerate(launch.disks)]


def _target(name: str):
    """(disks, the running guest or None, the profile or None) for a guest name, a defined
    VM or a profile. A running guest: the disks it was launched with. Else the defined VM
    or profile file `name` (its guest, if that one runs under the profile's name); else the
    disks of the guest's last run."""
    guest = Guest(name) if valid_name(name) else None
    if guest is not None and guest.qemu_pid() is not None:
        return _running_disks(guest), guest, None
    try:
        prof = defined.resolve(name)
    except KvmrunError:
        launch = guest.launch_or_none() if guest is not None else None
        if launch is None:
            raise
        prof = _last_profile(name, launch.summary.get("source"))
        if prof is not None:            # the profile file it last ran from, unchanged name
            return [(d.path, d.readonly or d.ephemeral) for d in prof.disks], None, prof
        shared = set(launch.shared_disks)
        return [(p, p in shared) for p in launch.disks], None, None
    running = Guest(prof.name)
    if running.qemu_pid() is not None:
        return _running_disks(running), running, prof
    return [(d.path, d.readonly or d.ephemeral) for d in prof.disks], None, prof


def _last_profile(name: str, source: str | None):
    if not source or not os.path.isfile(source):
        return None
    try:
        prof = defined.load(Path(source))
    except KvmrunError:
        return None
    return prof if prof.name == name else None


def default_name() -> str:
    return time.strftime("snap-%Y%m%d-%H%M%S")


def run(name: str, action: str, snap: str | None = None, *, disk_only: bool = False,
        note=lambda m: None) -> dict:
    """`kvmrun snapshot create|list|revert|delete NAME [SNAP]` (create without SNAP:
    snap-DATE-TIME): savevm/loadvm/delvm while the guest runs, qemu-img while it is stopped.
    `disk_only`: create, running: the disks without the VM state; revert, stopped: do not
    load the RAM state at the next start. Returns {"snapshot", "live", "frozen" and
    "disk_only" (create), "note", "resume" (revert: the next start loads the RAM state),
    "snapshots" (all of them afterwards)}."""
    if action == "create" and not snap:
        snap = default_name()
    disks, guest, prof = _target(name)
    result: dict = {"snapshot": snap, "live": guest is not None, "note": None}
    if action == "create" and guest is not None:
        snapshots.snapshot_disks(disks)           # refuse raw disks before freezing
        with agent.frozen(guest, note) as quiesce:
            rows = snapshots.snapshot(action, disks, snap, guest, disk_only=disk_only)
        result.update(frozen=quiesce.frozen, note=quiesce.note, disk_only=disk_only)
    elif action == "revert" and guest is None:
        rows = snapshots.snapshot(action, disks, snap, None)
        result["resume"] = _after_offline_revert(name, prof, snap, rows, disk_only, result)
    else:
        rows = snapshots.snapshot(action, disks, snap, guest)
        if action == "create":                    # a stopped VM: nothing to freeze
            result.update(frozen=None, disk_only=True)
        if action == "revert" and agent.thaw_if_frozen(guest):
            result["note"] = "the file systems were frozen in the snapshot's RAM state: thawed"
    if action == "delete" and prof is not None:
        _forget_resume(prof.name, snap)
    result["snapshots"] = rows
    return result


def listing(name: str) -> list[dict]:
    """`kvmrun snapshot list NAME`: the snapshots of its disks, each with "next_start":
    True for the one whose RAM state the VM's next start loads (an offline revert's)."""
    disks, guest, prof = _target(name)
    rows = snapshots.snapshot("list", disks, None, guest)
    pending = None
    if guest is None and prof is not None:
        data = files.read_json(paths.resume_path(prof.name), None)
        pending = data.get("snapshot") if isinstance(data, dict) else None
    for row in rows:
        row["next_start"] = row["name"] == pending
    return rows


def snapshot(name: str, action: str, snap: str | None = None) -> list[dict]:
    """`run`'s snapshots afterwards (the web UI's buttons)."""
    return run(name, action, snap)["snapshots"]


# ---------------------------------------------------------------- the RAM state at the next start

def _after_offline_revert(name: str, prof, snap: str, rows: list[dict], disk_only: bool,
                          result: dict) -> bool:
    """Arrange (or not) for the next start to load the RAM state of `snap`; True if so."""
    row = next((r for r in rows if r["name"] == snap), None)
    vm = prof.name if prof is not None else name
    paths.resume_path(vm).unlink(missing_ok=True)      # an earlier revert's is superseded
    if row is None or not row["vm_state_size"]:
        return False
    if disk_only:
        result["note"] = (f"{snap} has RAM state, not loaded (--disk-only): the next start "
                          "boots from the disk state")
        return False
    if prof is None or any(d.ephemeral for d in prof.disks):
        why = ("its ephemeral disk's state is gone" if prof is not None else
               f"{name} is not a defined VM or profile")
        result["note"] = (f"{snap} has RAM state, which cannot be loaded ({why}): the next "
                          "start boots from the disk state")
        return False
    files.write_json(paths.resume_path(vm), {"snapshot": snap, "disks": row["disks"],
                                        "made": int(time.time())}, make_dirs=0o700)
    result["note"] = (f"the next start of {vm} loads the RAM state of {snap} (-loadvm): the "
                      "guest goes on from that moment instead of booting; once")
    return True


def _forget_resume(vm: str, snap: str | None) -> None:
    pending = files.read_json(paths.resume_path(vm), None)
    if isinstance(pending, dict) and pending.get("snapshot") == snap:
        paths.resume_path(vm).unlink(missing_ok=True)


def take_resume(profile) -> str | None:
    """For a start of `profile`: the snapshot whose RAM state it loads (-loadvm), consumed
    (one-shot), or None. Dropped when the disks no longer carry that snapshot."""
    path = paths.resume_path(profile.name)
    if not path.exists():
        return None
    pending = files.read_json(path, None)
    path.unlink(missing_ok=True)                  # consumed, whatever it says
    if not isinstance(pending, dict) or not pending.get("snapshot"):
        return None
    snap = pending["snapshot"]
    writable = [d.path for d in profile.disks if not d.readonly and not d.ephemeral]
    if any(d.ephemeral for d in profile.disks) or sorted(map(os.path.realpath, writable)) \
            != sorted(map(os.path.realpath, pending.get("disks", []))):
        return None
    try:
        if any(snap not in {s["name"] for s in images.info(p)["snapshots"]}
               for p in writable):
            return None
    except KvmrunError:
        return None
    return snap
