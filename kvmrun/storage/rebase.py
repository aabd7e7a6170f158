"""An overlay's backing file: the one in its qcow2 header against the profile's `backing:`,
and `kvmrun disk rebase DISK --backing NEW` to point the header somewhere else.

QEMU reads a qcow2 overlay's base from the overlay's own header (`qemu-img info`'s
backing-filename); the profile's `backing:` is used only to create the overlay. When the two
name different files (the base was moved or copied and the profile edited, or the other way
round), the guest boots on the header's base while the profile says another: `validate` and
`start` report it, with both fixes.

`rebase` is `qemu-img rebase -u -b NEW -F FMT DISK`: an *unsafe* rebase, which rewrites only
the header and copies no data, so it is right only when NEW holds what the old base held
(a moved or copied base). What it checks first:

- DISK is a qcow2 image (only qcow2 has a backing file) that no running guest has open;
- NEW exists, is qcow2 or raw (its format is pinned with -F), and is not DISK or based on it;
- sizes, by QEMU's semantics: reads of an overlay past its base's end give zeros, and a base
  larger than the overlay has an end the guest never sees. An overlay is made at its base's
  size and can only grow (`disk resize`), so a NEW larger than DISK cannot be the base it was
  made on: refused. And when the old base is still readable, NEW must have its virtual size:
  a copy has, and a different size proves a different image.
"""

from __future__ import annotations

import os
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way

from kvmrun.errors import KvmrunError, ProfileError, StorageError
from kvmrun.storage import images
from kvmrun.storage.images import human

if TYPE_CHECKING:
    from kvmrun.profile import Profile


def _same(a: str, b: str) -> bool:
    return images.real(a) == images.real(b)


def header_backing(path: str) -> str | None:
    """The base an overlay's header names, absolute (relative names are relative to the
    overlay's directory), or None for an image without one."""
    info = images.image_info(path)
    name = info.get("full-backing-filename") or info.get("backing-filename")
    if name and not os.path.isabs(name) and not images.is_url(name):
        name = os.path.join(os.path.dirname(images.absolute(path)), name)
    return name


def mismatched(profile: Profile) -> list[ProfileError]:
    """Disks with `backing:` whose existing overlay is based on another file."""
    errors = []
    for i, disk in enumerate(profile.disks):
        if not disk.backing or disk.ephemeral or images.is_url(disk.path) \
                or not os.path.isfile(disk.path):
            continue
        try:
            actual = header_backing(disk.path)
        except KvmrunError:                   # unreadable: the start reports QEMU's reason
            continue
        if actual is not None and _same(actual, disk.backing):
            continue
        said = f"is based on {actual}" if actual else "has no backing file"
        errors.append(ProfileError(
            profile.location("disks", i, "backing"),
            f"the overlay {disk.path} {said}, not on {disk.backing} as the profile says",
            hint=(f"if {disk.backing} is a copy of {actual}: kvmrun disk rebase {disk.path} "
                  f"--backing {disk.backing}; else make the profile say backing: {actual}"
                  if actual else f"remove backing: from this disk, or point it at "
                                 f"{disk.backing}: kvmrun disk rebase {disk.path} "
                                 f"--backing {disk.backing}")))
    return errors


def rebase(path: str, backing: str) -> dict:
    """Point the qcow2 overlay `path` at the base `backing` (header only, checked first);
    returns kvmrun.storage.images.info of the overlay, with `old_backing`."""
    from kvmrun.guest.rundir import guest_using
    if images.is_url(path) or images.is_url(backing):
        raise StorageError("disk rebase works on local image files",
                           hint="qemu-img rebase -u can do it on nfs:// URLs by hand")
    path, backing = os.path.abspath(path), os.path.abspath(backing)
    fmt = images.detect_format(path)
    if fmt != "qcow2":
        raise StorageError(f"{path} is a {fmt} image: only a qcow2 image has a backing file")
    user = guest_using(path)
    if user:
        raise StorageError(f"{path} is in use by running guest {user[0]}",
                           hint=f"stop it first: kvmrun stop {user[0]}")
    if not images.exists(backing):
        raise StorageError(f"the new base {backing} does not exist")
    new_format = images.detect_format(backing)
    images.backing_chain(backing, path)          # NEW is not DISK, nor based on it
    size = images.image_info(path)["virtual-size"]      # opened without its base
    new_size = images.image_info(backing)["virtual-size"]
    if new_size > size:
        raise StorageError(
            f"the new base {backing} ({human(new_size)}) is larger than the overlay {path} "
            f"({human(size)}): an overlay is made at its base's size and only grows, so this "
            "cannot be the base it was made on")
    old = header_backing(path)
    if old and images.exists(old):
        if _same(old, backing):
            return {**images.info(path), "old_backing": old, "changed": False}
        old_size = images.image_info(old)["virtual-size"]
        if old_size != new_size:
            raise StorageError(
                f"the new base {backing} ({human(new_size)}) is not the size of the current "
                f"one {old} ({human(old_size)}): a rebase without copying is right only onto "
                "a copy of the same image")
    images.qemu_img_run("rebase", "-u", "-b", backing, "-F", new_format, path,
                        what="cannot rebase", path=path)
    return {**images.info(path), "old_backing": old, "changed": True}
