"""Disk images on top of qemu-img: format detection, creation (plain, sized, overlays on a
backing image), information, offline resizing, sizes.

Every qemu-img failure becomes a `StorageError` with a plain message; a creation that fails
leaves no file behind (images are made under a temporary name and linked into place).
A path may be the nfs:// URL of a userspace NFS pool's volume, which qemu-img opens itself
(kvmrun.storage.nfs); `exists`, `absolute`, `real` and `unlink` stand in for os.path there.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from kvmrun import proc
from kvmrun.errors import BadSize, HostError, KvmrunError, StorageError, shown
from kvmrun.storage import nfsclient, overlays
from kvmrun.storage.nfsclient import is_url

FORMATS = ("qcow2", "raw")


# ---------------------------------------------------------------- paths that may be nfs:// URLs

def exists(path) -> bool:
    return nfsclient.exists(path) if is_url(path) else os.path.lexists(path)


def absolute(path) -> str:
    return path if is_url(path) else os.path.abspath(path)


def real(path) -> str:
    return path if is_url(path) else os.path.realpath(path)


def unlink(path, missing_ok: bool = True) -> None:
    if is_url(path):
        return nfsclient.unlink(path, missing_ok=missing_ok)
    Path(path).unlink(missing_ok=missing_ok)
    overlays.forget(str(path))      # deleted on purpose: gone, but not lost


def qemu_img() -> str:
    found = proc.which("qemu-img")
    if not found:
        raise HostError("qemu-img not found on PATH", hint="install it: apt-get install qemu-utils")
    return found


def image_info(path: str) -> dict:
    out = proc.run([qemu_img(), "info", "--output=json", "-U", path], check=False, timeout=60)
    if out.returncode != 0:
        if is_url(path):
            err = nfsclient.explain(out.stderr, f"qemu-img cannot read {path}")
            raise HostError(err.message, err.hint)
        raise HostError(f"qemu-img cannot read {path}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------- sizes

_DISK_SIZE_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?", re.IGNORECASE)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_disk_size(text: str, relative: bool = False) -> tuple[str, int]:
    """'20G' -> ('', 21474836480); with relative, '+5G' -> ('+', …) and '-1G' -> ('-', …).
    A bare number is bytes (as with qemu-img); units are binary (K = 1024)."""
    m = _DISK_SIZE_RE.fullmatch(str(text).strip())
    if m and len(m.group(2)) > 24:          # exact arithmetic below; 24 digits is exabytes
        raise BadSize(f"{shown(text)} is larger than qcow2 images can be (64 PiB)")
    if not m or (m.group(1) and not relative):
        raise BadSize(f"{shown(text)} is not a disk size",
                      hint="write a size with a unit: 512M, 20G, 1.5T"
                      + (" (or +5G / -1G to grow or shrink)" if relative else ""))
    from fractions import Fraction     # here: it imports decimal (~3 ms of every start)
    value = Fraction(m.group(2)) * _UNIT[m.group(3).upper()]     # exact: no float infinity
    if value != int(value):
        raise BadSize(f"{shown(text)} is not a whole number of bytes")
    if value <= 0:
        raise BadSize(f"{shown(text)}: a disk size must be more than 0")
    if value > 64 * _UNIT["T"] * 1024:
        raise BadSize(f"{shown(text)} is larger than qcow2 images can be (64 PiB)")
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
    if is_url(path) and ("nfs" in low or "rpc" in low or "unknown protocol" in low):
        err = nfsclient.explain(stderr, f"{what} {path}")
        return StorageError(err.message, err.hint)
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


def qemu_img_run(*args: str, what: str, path: str, timeout: float = 600) -> str:
    try:
        out = proc.run([qemu_img(), *args], check=False, timeout=timeout)
    except HostError as err:
        raise StorageError(f"{what} {path}: {err.message}") from err
    if out.returncode != 0:
        raise _explain(out.stderr, what, path)
    return out.stdout


def detect_format(path: str) -> str:
    if not exists(path):
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
    current = absolute(base)
    seen = {real(target)} if target else set()
    while current:
        if real(current) in seen:
            loop = " -> ".join(([target] if target else []) + chain + [current])
            raise StorageError(f"backing chain loop: {loop}",
                               hint="an image cannot be based, directly or not, on itself")
        if not exists(current):
            if not chain:
                raise StorageError(f"backing image {current} not found")
            raise StorageError(f"backing chain broken: {chain[-1]} is based on {current}, "
                               "which is missing")
        seen.add(real(current))
        chain.append(current)
        info = image_info(current)
        nxt = info.get("full-backing-filename") or info.get("backing-filename")
        if nxt and not os.path.isabs(nxt) and not is_url(nxt):
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
    if is_url(str(path)):
        return _create_url(str(path), size, fmt, backing, backing_format)
    path = Path(os.path.abspath(path))
    if not os.path.lexists(path) and not path.parent.is_dir():
        raise StorageError(f"directory {path.parent} does not exist")
    args = _create_args(str(path), size, fmt, backing, backing_format,
                        os.path.lexists(path))
    tmp = path.with_name(f".{path.name}.kvmrun-{os.getpid()}.tmp")
    args.append(str(tmp))
    if size is not None:
        args.append(str(size))
    try:
        qemu_img_run(*args, what="cannot create", path=str(path))
        _place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    overlays.forget(str(path))      # made afresh on purpose: whatever was lost is replaced
    return info(str(path))


def _create_args(path: str, size: int | None, fmt: str | None, backing: str | None,
                 backing_format: str | None, taken: bool) -> list[str]:
    """qemu-img create's arguments (without the target) for `create`, checked first."""
    fmt = fmt or "qcow2"
    if fmt not in FORMATS:
        raise StorageError(f"format {fmt!r} is not supported", hint="use qcow2 or raw")
    if taken:
        raise StorageError(f"{path} already exists",
                           hint="choose another name, or resize it: kvmrun disk resize")
    args = ["create", "-q", "-f", fmt]
    if backing:
        if fmt != "qcow2":
            raise StorageError("an image with a backing file must be qcow2",
                               hint="leave out --format raw")
        backing = absolute(backing)
        backing_chain(backing, path)
        args += ["-b", backing, "-F", backing_format or detect_format(backing)]
    elif size is None:
        raise StorageError(f"{path}: give a size (--size 20G) or a backing image (--backing)")
    return args


def _create_url(path: str, size: int | None, fmt: str | None, backing: str | None,
                backing_format: str | None) -> dict:
    """create() for an nfs:// URL: made by qemu-img under a temporary name in the same
    export folder, then linked to its name with libnfs (which never replaces a file)."""
    args = _create_args(path, size, fmt, backing, backing_format, exists(path))
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.kvmrun-{os.getpid()}.tmp"
    try:
        qemu_img_run(*args, tmp, *([str(size)] if size is not None else []),
                     what="cannot create", path=path)
        nfsclient.place(tmp, path)
    except BaseException:
        try:
            nfsclient.unlink(tmp, missing_ok=True)
        except KvmrunError:
            pass
        raise
    return info(path)


def info(path: str) -> dict:
    """What qemu-img knows about an image and its backing chain, in a small JSON form."""
    if not exists(path):
        raise StorageError(f"no such disk image: {path}")
    out = qemu_img_run("info", "--output=json", "--backing-chain", "-U", path,
                    what="cannot read", path=path, timeout=60)
    chain = json.loads(out)
    chain = chain if isinstance(chain, list) else [chain]
    top = chain[0]
    return {
        "path": absolute(path),
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
        qemu_img_run("create", "-q", "-f", "qcow2", "-b", absolute(base), "-F", base_format,
                     str(tmp), what="cannot create the overlay of", path=base)
        os.rename(tmp, overlay)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_new_size(path: str, old: int, new: int, shrink: bool) -> None:
    if new <= 0:
        raise StorageError(f"{path}: the new size would be {new} bytes")
    if new < old and not shrink:
        raise StorageError(f"{path}: {human(new)} is smaller than the disk ({human(old)})",
                           hint="shrinking cuts off the end of the disk and what is stored "
                                "there; add --shrink if you mean it (shrink the guest's "
                                "file system first)")


