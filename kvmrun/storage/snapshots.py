"""Internal qcow2 snapshots of a VM's writable disks: through the running guest's monitor
(savevm/loadvm/delvm, with the VM state) or, while it is stopped, with qemu-img (disks only).
"""

from __future__ import annotations

import re

from kvmrun.errors import QMPError, StorageError
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
             guest: Guest | None = None) -> list[dict]:
    """create/list/revert/delete an internal snapshot on every writable disk: through the
    running guest's monitor (savevm/loadvm/delvm, with the VM state) when `guest` is given,
    else with qemu-img (disks only)."""
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
    if guest is not None and action != "list":
        _hmp(guest, {"create": "savevm", "revert": "loadvm", "delete": "delvm"}[action]
             + f" {snap}")
    elif action != "list":
        flag = {"create": "-c", "revert": "-a", "delete": "-d"}[action]
        for path in paths:
            qemu_img_run("snapshot", flag, snap, path,
                      what=f"cannot {action} snapshot {snap} of", path=path)
    return snapshot_list(paths)


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
