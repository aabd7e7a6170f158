"""A profile's disks against this host: pool volumes resolved to paths, formats detected,
missing sized/backed disks created before a launch (and removed again if it fails), the
throwaway overlays of ephemeral disks, which running guest uses a disk, resizing (live
through QMP `block_resize` when a running guest has the disk open).
"""

from __future__ import annotations

from kvmrun import records
from kvmrun.errors import (GuestError, HostError, KvmrunError, PoolError, ProfileError,
                           ProfileErrors, StorageError)
from kvmrun.guest.rundir import Guest, guest_using
from kvmrun.paths import RunPaths
from kvmrun.profile import Profile
from kvmrun.storage import overlays, pools
from kvmrun.storage.cloudinit import build_seed
from kvmrun.storage import images
from kvmrun.storage.images import (check_new_size, create, create_overlay, detect_format,
                                   info, parse_disk_size, qemu_img_run)



def resolve(profile: Profile) -> Profile:
    """The profile as this host runs it: pool volumes as paths (an lvm volume is
    /dev/VG/VOLUME, raw) and every disk's format set (see `with_formats`)."""
    return with_formats(resolve_pools(profile))


def resolve_pools(profile: Profile) -> Profile:
    """Disks given as pool + volume get the volume's path (from the pool's definition)."""
    disks, errors = [], []
    for i, disk in enumerate(profile.disks):
        if disk.pool and disk.volume:
            try:
                disk = pools.resolve_disk(disk)
            except PoolError as err:
                errors.append(ProfileError(profile.location("disks", i, err.key), err.message,
                                           err.hint))
        disks.append(disk)
    if errors:
        raise ProfileErrors(errors)
    return records.replace(profile, disks=tuple(disks))


def with_formats(profile: Profile) -> Profile:
    """The profile with every disk's format set, detected with qemu-img where the profile
    left it out. Disks that do not exist keep format None (QEMU will be told to probe).
    A block device without a format is raw: it is not probed, since what a guest wrote on
    a raw device (a qcow2 header, say) must not change how the next start opens it."""
    disks = []
    for i, disk in enumerate(profile.disks):
        if not images.exists(disk.path) and (disk.size or disk.backing):
            disk = records.replace(disk, format=disk.format or "qcow2")   # made at start
        if disk.format is None and images.is_block_device(disk.path):
            disk = records.replace(disk, format="raw")
        if disk.format is None and images.exists(disk.path):
            try:
                fmt = images.image_info(disk.path)["format"]
            except HostError as err:
                raise ProfileError(profile.location("disks", i, "path"), err.message) from err
            if fmt not in ("qcow2", "raw"):
                raise ProfileError(profile.location("disks", i, "path"),
                                   f"image format {fmt!r} is not supported (qcow2 or raw)",
                                   hint=f"convert it: qemu-img convert -O qcow2 {disk.path} "
                                        "NEW.qcow2")
            disk = records.replace(disk, format=fmt)
        disks.append(disk)
    return records.replace(profile, disks=tuple(disks))


def ensure_disks(profile: Profile) -> list[str]:
    """Create the profile's missing disks that say `size:` or `backing:`; returns the paths
    made (so a failed start can remove them again)."""
    made = []
    for i, disk in enumerate(profile.disks):
        if not (disk.size or disk.backing) or images.exists(disk.path):
            continue
        try:
            create(disk.path, disk.size * 1024 * 1024 if disk.size else None,
                   disk.format or "qcow2", disk.backing)
        except StorageError as err:
            for path in made:
                images.unlink(path)
            raise ProfileError(profile.location("disks", i), err.message, err.hint) from err
        made.append(disk.path)
        if disk.backing:                # remembered: a lost overlay is an error later
            overlays.remember(disk.path, disk.backing)
    return made


# ---------------------------------------------------------------- resize

def resize(path: str, size: str, shrink: bool = False, live: str | None = None) -> dict:
    """Grow (or with shrink, shrink) an image: `size` is 30G, +5G or -1G. A disk a running
    guest has open is resized live through QMP block_resize (with `live`, that guest must be
    the one); otherwise qemu-img resizes it."""
    sign, amount = parse_disk_size(size, relative=True)
    user = guest_using(path)
    if live and (user is None or user[0] != live):
        if Guest(live).qemu_pid() is None:
            raise GuestError(f"{live} is not running", hint="without --live, a disk no guest "
                                                            "uses is resized with qemu-img")
        raise GuestError(f"{live} does not have {path} open")
    if user is not None:
        name, index, ephemeral = user
        if ephemeral:
            raise GuestError(f"{path} is the base of an ephemeral disk of running guest "
                             f"{name!r}; a base cannot change under its overlay",
                             hint=f"stop {name} first")
        return _resize_live(path, name, index, sign, amount, shrink)
    if not images.exists(path):
        raise StorageError(f"no such disk image: {path}")
    current = info(path)
    old = current["virtual_size"]
    new = old + amount if sign == "+" else old - amount if sign == "-" else amount
    check_new_size(path, old, new, shrink)
    args = ["resize", "-q", "-f", current["format"]] + (["--shrink"] if new < old else [])
    qemu_img_run(*args, path, str(new), what="cannot resize", path=path)
    return {**info(path), "old_size": old, "live": None}


def _resize_live(path: str, name: str, index: int, sign: str, amount: int,
                 shrink: bool) -> dict:
    from kvmrun.guest.qmp import query     # a running guest's disk only (its socket: ~4 ms)
    guest = Guest(name)
    drive = f"drive-disk{index}"
    blocks = query(guest.paths.qmp_cli, "query-block", timeout=10)
    found = next((b for b in blocks if b.get("device") == drive and b.get("inserted")), None)
    if found is None:
        raise GuestError(f"{name} has no drive {drive} for {path}")
    old = found["inserted"]["image"]["virtual-size"]
    new = old + amount if sign == "+" else old - amount if sign == "-" else amount
    check_new_size(path, old, new, shrink)
    query(guest.paths.qmp_cli, "block_resize", {"device": drive, "size": new}, timeout=60)
    return {"path": images.absolute(path), "virtual_size": new, "old_size": old,
            "live": name, "device": drive}


# ---------------------------------------------------------------- before a launch

def prepare_guest(profile: Profile, paths: RunPaths) -> list[str]:
    """What a launch does right before QEMU starts (under the guest's lock): create missing
    sized/backed disks, the throwaway overlays of ephemeral disks and the cloud-init seed.
    Returns the disks created, so a failed start can remove them."""
    made = ensure_disks(profile)
    try:
        for i, disk in enumerate(profile.disks):
            if disk.ephemeral:
                create_overlay(paths.overlay(i), disk.path, disk.format or detect_format(
                    disk.path))
        if profile.cloud_init:
            build_seed(profile, paths.cidata)
    except BaseException:
        remove_created(made)
        raise
    return made


def remove_created(made) -> None:
    for path in made:
        try:
            images.unlink(path)
        except (FileNotFoundError, KvmrunError):
            pass


def all_ephemeral(profile: Profile) -> Profile:
    """The whole VM throwaway (`start --ephemeral`, `run --rm`): every writable disk."""
    return records.replace(profile, disks=tuple(
        d if d.readonly else records.replace(d, ephemeral=True) for d in profile.disks))


