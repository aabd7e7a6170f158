"""Internal qcow2 snapshots of a VM's writable disks: through the running guest's monitor
(savevm/loadvm/delvm, with the VM state; or, `disk_only`, a QMP transaction of
blockdev-snapshot-internal-sync, one per disk, atomic, without it) or, while it is stopped,
with qemu-img (disks only).
"""

from __future__ import annotations

import os
import re

from kvmrun.errors import GuestError, QMPError, StorageError
from kvmrun.guest.qmp import query
from kvmrun.guest.rundir import Guest
from kvmrun.storage.images import detect_format, info, qemu_img_run


def _hmp(guest: Guest, command: str) -> str:
    """A human-monitor command over the CLI's QMP socket; its text output is an error if it
    says so (savevm/loadvm/delvm report failures only as text)."""
    text = query(guest.paths.qmp_cli, "human-monitor-command",
                 {"command-line": command}, timeout=600) or ""
    if re.search(r"^(Error|.*error)", text, re.IGNORECASE | re.MULTILINE):
        raise QMPError(f"{command}: {text.strip()}")
    return text


def snapshot_disks(disks: list[tuple[str, bool]]) -> list[str]:
    """The writable disks a snapshot covers; refuses raw ones with a clear message.
    `disks` is [(path, read-only or ephemeral)]."""
    covered = []
    for path, skip in disks:
        if skip:
            continue
        fmt = detect_format(path)
        if fmt != "qcow2":
            raise StorageError(f"{path} is a {fmt} disk: snapshots need qcow2 disks",
                               hint=f"convert it: qemu-img convert -O qcow2 {path} NEW.qcow2, "
                                    "and point the profile at the new image")
        covered.append(path)
    if not covered:
        raise StorageError("this VM has no writable qcow2 disk to snapshot")
    return covered


def snapshot(action: str, disks: list[tuple[str, bool]], snap: str | None = None,
             guest: Guest | None = None, *, disk_only: bool = False) -> list[dict]:
    """create/list/revert/delete an internal snapshot on every writable disk: through the
    running guest's monitor (savevm/loadvm/delvm, with the VM state) when `guest` is given,
    else with qemu-img (disks only). `disk_only` create on a running guest: the disks only,
    atomically, in one QMP transaction (no VM state: a revert boots from the disks)."""
    paths = snapshot_disks(disks)
    if snap is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", snap):
        raise StorageError(f"{snap!r} is not a usable snapshot name",
                           hint="letters, digits and . _ : - (not starting with one of them)")
    if action != "list" and action != "create":
        known = {s["name"] for s in snapshot_list(paths)}
        if snap not in known:
            raise StorageError(f"no snapshot named {snap!r}",
                               hint="known: " + (", ".join(sorted(known)) or "none"))
    if action == "create" and snap in {s["name"] for s in snapshot_list(paths)}:
        raise StorageError(f"a snapshot named {snap!r} exists already",
                           hint="choose another name, or delete it first")
    if guest is not None and action == "revert":
        row = next(r for r in snapshot_list(paths) if r["name"] == snap)
        if not row["vm_state_size"]:
            raise GuestError(f"{snap} is a disk-only snapshot (no RAM state): it cannot be "
                             f"reverted while {guest.name} runs",
                             hint=f"stop it first (kvmrun stop {guest.name}), then: kvmrun "
                                  f"snapshot revert {guest.name} {snap}; the next start "
                                  "boots from the reverted disks")
    if guest is not None and action == "create" and disk_only:
        _disk_transaction(guest, paths, snap)
    elif guest is not None and action == "create":
        try:
            _hmp(guest, f"savevm {snap}")
        except QMPError as err:
            refused = _unsaveable(guest, err.message)
            if refused is None:
                raise
            raise QMPError(f"this guest has a device whose state cannot be saved "
                           f"({refused}): a snapshot with RAM state is impossible",
                           hint=f"take a disk-only snapshot: kvmrun snapshot create "
                                f"{guest.name} {snap} --disk-only") from None
    elif guest is not None and action != "list":
        _hmp(guest, {"create": "savevm", "revert": "loadvm", "delete": "delvm"}[action]
             + f" {snap}")
    elif action != "list":
        flag = {"create": "-c", "revert": "-a", "delete": "-d"}[action]
        for path in paths:
            qemu_img_run("snapshot", flag, snap, path,
                      what=f"cannot {action} snapshot {snap} of", path=path)
    return snapshot_list(paths)


def _disk_transaction(guest: Guest, paths: list[str], snap: str) -> None:
    """One internal snapshot per disk in `paths`, all or none: a QMP transaction of
    blockdev-snapshot-internal-sync on the block devices (drive-diskN) that have them open."""
    devices = {os.path.realpath(b["inserted"]["file"]): b["device"]
               for b in query(guest.paths.qmp_cli, "query-block", timeout=10)
               if b.get("inserted") and b.get("device")}
    actions = []
    for path in paths:
        device = devices.get(os.path.realpath(path))
        if device is None:
            raise StorageError(f"{guest.name} does not have {path} open (query-block)",
                               hint="was the disk changed or ejected? stop the VM and "
                                    "snapshot it stopped")
        actions.append({"type": "blockdev-snapshot-internal-sync",
                        "data": {"device": device, "name": snap}})
    query(guest.paths.qmp_cli, "transaction", {"actions": actions}, timeout=600)


_BLOCKED = (re.compile(r"non-migratable device '([^']*)'"),
            re.compile(r"(Migration is disabled[^\n]*)"))


def _unsaveable(guest: Guest, text: str) -> str | None:
    """What QEMU named as the reason savevm cannot save the VM state (a device that cannot
    be migrated: a virtiofs share, …), or None for another failure."""
    for pattern in _BLOCKED:
        found = pattern.search(text)
        if found is None:
            continue
        what = found.group(1)
        if "vhost-user-fs" in what:
            launch = guest.launch_or_none()
            tags = [s.get("tag") for s in (launch.shares if launch else [])
                    if s.get("type") == "virtiofs"]
            share = "virtiofs share " + ", ".join(t for t in tags if t)
            return f"{share.rstrip()}; QEMU device {what}"
        return f"QEMU: {what}"
    return None


def snapshot_list(paths: list[str]) -> list[dict]:
    """Snapshots by name, with the disks that have each."""
    by_name: dict[str, dict] = {}
    for path in paths:
        for s in info(path)["snapshots"]:
            row = by_name.setdefault(s["name"], {"name": s["name"], "date": s["date"],
                                                 "vm_state_size": s["vm_state_size"] or 0,
                                                 "disks": []})
            row["disks"].append(path)
            row["vm_state_size"] = max(row["vm_state_size"], s["vm_state_size"] or 0)
    return sorted(by_name.values(), key=lambda r: (r["date"] or 0, r["name"]))
