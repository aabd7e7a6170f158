"""Disks on top of qemu-img: format detection, creation (plain, sized, overlays on a backing
image), information, resizing (offline with qemu-img, live through QMP `block_resize`),
the throwaway overlays of ephemeral disks, and internal qcow2 snapshots.

Every qemu-img failure becomes a `StorageError` with a plain message; a creation that fails
leaves no file behind (images are made under a temporary name and linked into place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from kvmrun.errors import GuestError, HostError, KvmrunError, ProfileError
from kvmrun.profile import Profile

FORMATS = ("qcow2", "raw")


class StorageError(KvmrunError):
    """A disk operation failed (bad size, missing base, qemu-img refused, no space…)."""


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if not found:
        raise HostError("qemu-img not found on PATH", hint="install it: apt-get install qemu-utils")
    return found


def image_info(path: str) -> dict:
    try:
        out = subprocess.run([qemu_img(), "info", "--output=json", "-U", path],
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise HostError(f"qemu-img info {path} timed out") from err
    if out.returncode != 0:
        raise HostError(f"qemu-img cannot read {path}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def with_formats(profile: Profile) -> Profile:
    """The profile with every disk's format set, detected with qemu-img where the profile
    left it out. Disks that do not exist keep format None (QEMU will be told to probe).
    A block device without a format is raw: it is not probed, since what a guest wrote on
    a raw device (a qcow2 header, say) must not change how the next start opens it."""
    disks = []
    for i, disk in enumerate(profile.disks):
        if not Path(disk.path).exists() and (disk.size or disk.backing):
            disk = dataclasses.replace(disk, format=disk.format or "qcow2")   # made at start
        if disk.format is None and is_block_device(disk.path):
            disk = dataclasses.replace(disk, format="raw")
        if disk.format is None and Path(disk.path).exists():
            try:
                fmt = image_info(disk.path)["format"]
            except HostError as err:
                raise ProfileError(profile.location("disks", i, "path"), err.message) from err
            if fmt not in ("qcow2", "raw"):
                raise ProfileError(profile.location("disks", i, "path"),
                                   f"image format {fmt!r} is not supported (qcow2 or raw)",
                                   hint=f"convert it: qemu-img convert -O qcow2 {disk.path} "
                                        "NEW.qcow2")
            disk = dataclasses.replace(disk, format=fmt)
        disks.append(disk)
    return dataclasses.replace(profile, disks=tuple(disks))


# ---------------------------------------------------------------- sizes

_DISK_SIZE_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?", re.IGNORECASE)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_disk_size(text: str, relative: bool = False) -> tuple[str, int]:
    """'20G' -> ('', 21474836480); with relative, '+5G' -> ('+', …) and '-1G' -> ('-', …).
    A bare number is bytes (as with qemu-img); units are binary (K = 1024)."""
    m = _DISK_SIZE_RE.fullmatch(str(text).strip())
    if not m or (m.group(1) and not relative):
        raise StorageError(f"{text!r} is not a disk size",
                           hint="write a size with a unit: 512M, 20G, 1.5T"
                           + (" (or +5G / -1G to grow or shrink)" if relative else ""))
    value = float(m.group(2)) * _UNIT[m.group(3).upper()]
    if value != int(value):
        raise StorageError(f"{text!r} is not a whole number of bytes")
    if value <= 0:
        raise StorageError(f"{text!r}: a disk size must be more than 0")
    if value > 64 * _UNIT["T"] * 1024:
        raise StorageError(f"{text!r} is larger than qcow2 images can be (64 PiB)")
    return m.group(1), int(value)


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return str(n)


# ---------------------------------------------------------------- qemu-img

def _explain(stderr: str, what: str, path: str) -> StorageError:
    """qemu-img's stderr as one clear StorageError."""
    text = "\n".join(line.removeprefix("qemu-img: ").strip()
                     for line in stderr.strip().splitlines()) or "no message"
    low = text.lower()
    if "no space left" in low or "disk quota" in low:
        return StorageError(f"{what} {path}: not enough space in "
                            f"{os.path.dirname(os.path.abspath(path))}",
                            hint="free some space or choose another directory")
    if 'failed to get "write" lock' in low or "failed to get shared" in low:
        return StorageError(f"{what} {path}: the image is in use by another process",
                            hint="stop the guest (or program) using it first")
    if "permission denied" in low:
        return StorageError(f"{what} {path}: permission denied ({text})")
    if "snapshot" in low and "resize" in low:
        return StorageError(f"{what} {path}: {text}",
                            hint="qcow2 images with internal snapshots cannot be resized; "
                                 "delete the snapshots first (kvmrun snapshot delete)")
    return StorageError(f"{what} {path}: {text}")


def _qemu_img(*args: str, what: str, path: str, timeout: float = 600) -> str:
    try:
        out = subprocess.run([qemu_img(), *args], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise StorageError(f"{what} {path}: qemu-img did not finish in {timeout:g}s") from err
    if out.returncode != 0:
        raise _explain(out.stderr, what, path)
    return out.stdout


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise StorageError(f"no such disk image: {path}")
    if is_block_device(path):
        return "raw"                          # not probed (see with_formats)
    try:
        fmt = image_info(path)["format"]
    except HostError as err:
        raise StorageError(err.message) from err
    if fmt not in FORMATS:
        raise StorageError(f"{path}: image format {fmt!r} is not supported (qcow2 or raw)",
                           hint=f"convert it: qemu-img convert -O qcow2 {path} NEW.qcow2")
    return fmt


def backing_chain(base: str, target: str | None = None) -> list[str]:
    """The chain base, its backing file, … (absolute paths), read one image at a time so
    that a loop (an image backing onto itself, or onto `target`) is found, not followed."""
    chain: list[str] = []
    current = os.path.abspath(base)
    seen = {os.path.realpath(target)} if target else set()
    while current:
        if os.path.realpath(current) in seen:
            loop = " -> ".join(([target] if target else []) + chain + [current])
            raise StorageError(f"backing chain loop: {loop}",
                               hint="an image cannot be based, directly or not, on itself")
        if not os.path.exists(current):
            if not chain:
                raise StorageError(f"backing image {current} not found")
            raise StorageError(f"backing chain broken: {chain[-1]} is based on {current}, "
                               "which is missing")
        seen.add(os.path.realpath(current))
        chain.append(current)
        info = image_info(current)
        nxt = info.get("full-backing-filename") or info.get("backing-filename")
        if nxt and not os.path.isabs(nxt):
            nxt = os.path.join(os.path.dirname(current), nxt)
        current = nxt
    return chain


def _place(tmp: Path, path: Path) -> None:
    """Move a finished image into place without ever replacing an existing file."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise StorageError(f"{path} already exists") from None
    except OSError:
        if path.exists():
            raise StorageError(f"{path} already exists") from None
        os.rename(tmp, path)
        return
    tmp.unlink()


def create(path: str | Path, size: int | None = None, fmt: str | None = None,
           backing: str | None = None, backing_format: str | None = None) -> dict:
    """Create a disk image: `size` bytes of `fmt` (default qcow2), or a qcow2 overlay on
    `backing` (its format pinned with -F; size defaults to the base's). Never overwrites;
    on any failure no file is left."""
    path = Path(os.path.abspath(path))
    fmt = fmt or "qcow2"
    if fmt not in FORMATS:
        raise StorageError(f"format {fmt!r} is not supported", hint="use qcow2 or raw")
    if os.path.lexists(path):
        raise StorageError(f"{path} already exists",
                           hint="choose another name, or resize it: kvmrun disk resize")
    if not path.parent.is_dir():
        raise StorageError(f"directory {path.parent} does not exist")
    args = ["create", "-q", "-f", fmt]
    if backing:
        if fmt != "qcow2":
            raise StorageError("an image with a backing file must be qcow2",
                               hint="leave out --format raw")
        backing = os.path.abspath(backing)
        backing_chain(backing, str(path))
        backing_format = backing_format or detect_format(backing)
        args += ["-b", backing, "-F", backing_format]
    elif size is None:
        raise StorageError(f"{path}: give a size (--size 20G) or a backing image (--backing)")
    tmp = path.with_name(f".{path.name}.kvmrun-{os.getpid()}.tmp")
    args.append(str(tmp))
    if size is not None:
        args.append(str(size))
    try:
        _qemu_img(*args, what="cannot create", path=str(path))
        _place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info(str(path))


def info(path: str) -> dict:
    """What qemu-img knows about an image and its backing chain, in a small JSON form."""
    if not os.path.lexists(path):
        raise StorageError(f"no such disk image: {path}")
    out = _qemu_img("info", "--output=json", "--backing-chain", "-U", path,
                    what="cannot read", path=path, timeout=60)
    chain = json.loads(out)
    chain = chain if isinstance(chain, list) else [chain]
    top = chain[0]
    return {
        "path": os.path.abspath(path),
        "format": top.get("format"),
        "virtual_size": top.get("virtual-size"),
        "actual_size": top.get("actual-size"),
        "cluster_size": top.get("cluster-size"),
        "backing_file": top.get("full-backing-filename") or top.get("backing-filename"),
        "backing_format": top.get("backing-filename-format"),
        "backing_chain": [c.get("filename") for c in chain[1:]],
        "snapshots": [{"id": s.get("id"), "name": s.get("name"),
                       "vm_state_size": s.get("vm-state-size"),
                       "date": s.get("date-sec")} for s in top.get("snapshots", [])],
        "dirty": bool(top.get("dirty-flag")),
        "encrypted": bool(top.get("encrypted")),
    }


def create_overlay(overlay: Path, base: str, base_format: str) -> None:
    """The throwaway qcow2 overlay of an ephemeral disk: writes land here, never in `base`."""
    overlay.unlink(missing_ok=True)
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    try:
        _qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.abspath(base), "-F", base_format,
                  str(tmp), what="cannot create the overlay of", path=base)
        os.rename(tmp, overlay)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_disks(profile: Profile) -> list[str]:
    """Create the profile's missing disks that say `size:` or `backing:`; returns the paths
    made (so a failed start can remove them again)."""
    made = []
    for i, disk in enumerate(profile.disks):
        if os.path.lexists(disk.path) or not (disk.size or disk.backing):
            continue
        try:
            create(disk.path, disk.size * 1024 * 1024 if disk.size else None,
                   disk.format or "qcow2", disk.backing)
        except StorageError as err:
            for path in made:
                os.unlink(path)
            raise ProfileError(profile.location("disks", i), err.message, err.hint) from err
        made.append(disk.path)
    return made


# ---------------------------------------------------------------- who uses a disk

def guest_using(path: str) -> tuple[str, int, bool] | None:
    """(guest name, disk index, ephemeral) of a running kvmrun guest that has `path` open."""
    from kvmrun import runtime
    real = os.path.realpath(path)
    for name in runtime.guest_names():
        guest = runtime.Guest(name)
        if guest.qemu_pid() is None:
            continue
        try:
            launch = guest.read_launch()
        except (OSError, ValueError):
            continue
        ephemeral = set(launch.get("ephemeral_disks", []))
        for i, used in enumerate(launch.get("disks", [])):
            if os.path.realpath(used) == real:
                return name, i, i in ephemeral
    return None


# ---------------------------------------------------------------- resize

def resize(path: str, size: str, shrink: bool = False, live: str | None = None) -> dict:
    """Grow (or with shrink, shrink) an image: `size` is 30G, +5G or -1G. A disk a running
    guest has open is resized live through QMP block_resize (with `live`, that guest must be
    the one); otherwise qemu-img resizes it."""
    sign, amount = parse_disk_size(size, relative=True)
    user = guest_using(path)
    if live and (user is None or user[0] != live):
        from kvmrun.runtime import Guest
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
    if not os.path.lexists(path):
        raise StorageError(f"no such disk image: {path}")
    current = info(path)
    old = current["virtual_size"]
    new = old + amount if sign == "+" else old - amount if sign == "-" else amount
    _check_new_size(path, old, new, shrink)
    args = ["resize", "-q", "-f", current["format"]] + (["--shrink"] if new < old else [])
    _qemu_img(*args, path, str(new), what="cannot resize", path=path)
    return {**info(path), "old_size": old, "live": None}


def _check_new_size(path: str, old: int, new: int, shrink: bool) -> None:
    if new <= 0:
        raise StorageError(f"{path}: the new size would be {new} bytes")
    if new < old and not shrink:
        raise StorageError(f"{path}: {human(new)} is smaller than the disk ({human(old)})",
                           hint="shrinking cuts off the end of the disk and what is stored "
                                "there; add --shrink if you mean it (shrink the guest's "
                                "file system first)")


def _resize_live(path: str, name: str, index: int, sign: str, amount: int,
                 shrink: bool) -> dict:
    from kvmrun.qmp import query
    from kvmrun.runtime import Guest
    guest = Guest(name)
    drive = f"drive-disk{index}"
    blocks = query(guest.paths.qmp_cli, "query-block", timeout=10)
    found = next((b for b in blocks if b.get("device") == drive and b.get("inserted")), None)
    if found is None:
        raise GuestError(f"{name} has no drive {drive} for {path}")
    old = found["inserted"]["image"]["virtual-size"]
    new = old + amount if sign == "+" else old - amount if sign == "-" else amount
    _check_new_size(path, old, new, shrink)
    query(guest.paths.qmp_cli, "block_resize", {"device": drive, "size": new}, timeout=60)
    return {"path": os.path.abspath(path), "virtual_size": new, "old_size": old,
            "live": name, "device": drive}


# ---------------------------------------------------------------- before a launch

def prepare_guest(profile: Profile, paths) -> list[str]:
    """What control does right before a launch (under the guest's lock): create missing
    sized/backed disks, the throwaway overlays of ephemeral disks and the cloud-init seed.
    Returns the disks created, so a failed start can remove them."""
    made = ensure_disks(profile)
    try:
        for i, disk in enumerate(profile.disks):
            if disk.ephemeral:
                create_overlay(paths.overlay(i), disk.path, disk.format or detect_format(
                    disk.path))
        if profile.cloud_init:
            from kvmrun import cloudinit
            cloudinit.build_seed(profile, paths.cidata)
    except BaseException:
        remove_created(made)
        raise
    return made


def remove_created(made) -> None:
    for path in made:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def all_ephemeral(profile: Profile) -> Profile:
    """The whole VM throwaway (`start --ephemeral`, `run --rm`): every writable disk."""
    return dataclasses.replace(profile, disks=tuple(
        d if d.readonly else dataclasses.replace(d, ephemeral=True) for d in profile.disks))


# ---------------------------------------------------------------- snapshots

def _hmp(guest, command: str) -> str:
    """A human-monitor command over the CLI's QMP socket; its text output is an error if it
    says so (savevm/loadvm/delvm report failures only as text)."""
    from kvmrun.errors import QMPError
    from kvmrun.qmp import query
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
             guest=None) -> list[dict]:
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
            _qemu_img("snapshot", flag, snap, path,
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
