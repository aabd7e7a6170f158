"""Overlays kvmrun made, remembered, so a lost one is an error and not a silent reset.

A disk with `backing:` whose file is missing is created on first start as an empty qcow2
overlay on its base. Once the guest has written to it, the overlay *is* the guest's state: if
it later disappears (deleted by hand, a volume not mounted, a path typo fixed the wrong way),
creating it again empty would boot the guest from its pristine base without a word. So every
overlay kvmrun makes is recorded in `<data_dir>/overlays.json` (real path -> backing, when),
and `validate` and `start` refuse a recorded overlay that is gone (kvmrun.qemu.checks).
Creating or deleting an image through kvmrun (`kvmrun disk create`, `disk delete`, a failed
start removing what it made: kvmrun.storage.images) is the deliberate way to start afresh: it
forgets the record. Local paths only (an nfs:// overlay is not recorded).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way

from kvmrun import files, paths
from kvmrun.errors import ProfileError

if TYPE_CHECKING:
    from kvmrun.profile import Profile


def _record() -> Path:
    return paths.data_dir() / "overlays.json"


def _load() -> dict:
    value = files.read_json(_record(), {})
    return value if isinstance(value, dict) else {}


def _update(change) -> None:
    record = _record()
    with files.flocked(record.with_name(".overlays.lock")):
        data = _load()
        change(data)
        files.write_json(record, data, make_dirs=0o700)


def _local(path: str) -> bool:
    return "://" not in str(path)


def remember(path: str, backing: str) -> None:
    """kvmrun just made `path` as an overlay on `backing`."""
    if not _local(path):
        return
    key = os.path.realpath(path)
    _update(lambda d: d.__setitem__(key, {"backing": backing, "made": int(time.time())}))


def forget(path: str) -> None:
    """`path` was deleted or re-created on purpose."""
    if not _local(path):
        return
    key = os.path.realpath(path)
    if key in _load():
        _update(lambda d: d.pop(key, None))


def lost(profile: Profile) -> list[ProfileError]:
    """The profile's backing-file disks whose overlay kvmrun made earlier and is now gone."""
    disks = [(i, d) for i, d in enumerate(profile.disks)
             if d.backing and _local(d.path) and not os.path.lexists(d.path)]
    if not disks:
        return []
    known = _load()
    errors = []
    for i, disk in disks:
        seen = known.get(os.path.realpath(disk.path))
        if not seen:
            continue
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(seen.get("made", 0)))
        errors.append(ProfileError(
            profile.location("disks", i, "path"),
            f"the overlay {disk.path} (made by kvmrun on {made} on {disk.backing}) is gone; "
            f"starting would make it again, empty, and the guest's changes would be lost",
            hint=f"restore the file; or, to start afresh from the base, make a new overlay: "
                 f"kvmrun disk create {disk.path} --backing {disk.backing}"))
    return errors
