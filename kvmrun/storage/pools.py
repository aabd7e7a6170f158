"""Storage pools, like libvirt's `dir` and `logical` pools. A pool is a small JSON file in
$KVMRUN_CONFIG_DIR/pools/NAME.json of one of two types:

  dir   a directory; its volumes are the image files in it (qcow2 or raw)
  lvm   an LVM volume group; its volumes are logical volumes, /dev/VG/VOLUME, always raw
        (driven by kvmrun.storage.lvm)

Profiles name a volume with `pool:` + `volume:` (see `resolve_disk`); every failure is one
plain `PoolError`, and a volume whose creation fails is not left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from kvmrun.errors import GuestError, KvmrunError, PoolError
from kvmrun.files import atomic_write
from kvmrun.guest import rundir
from kvmrun.paths import NAME_RE, config_dir
from kvmrun.storage import images, lvm

VOLUME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]*"


def pool_dir() -> Path:
    return config_dir() / "pools"


def _file(name: str) -> Path:
    if not re.fullmatch(NAME_RE, name):
        raise PoolError(f"{name!r} is not a valid pool name",
                        hint="letters and digits, with . _ - between them")
    return pool_dir() / f"{name}.json"


def names() -> list[str]:
    try:
        return sorted(p.stem for p in pool_dir().glob("*.json"))
    except OSError:
        return []


def get(name: str) -> dict:
    try:
        data = json.loads(_file(name).read_text())
    except FileNotFoundError:
        known = names()
        raise PoolError(f"no storage pool named {name!r}",
                        hint=("pools: " + ", ".join(known)) if known else
                        "define one: kvmrun pool define NAME DIRECTORY") from None
    return {"name": name, **data}


def define(name: str, directory: str | None = None, type: str = "dir",
           vg: str | None = None) -> dict:
    """Define a pool: `directory` for a dir pool (made if missing), `vg` (an existing LVM
    volume group) for an lvm pool."""
    path = _file(name)
    if path.exists():
        pool = get(name)
        raise PoolError(f"pool {name!r} is already defined ({pool['path']})",
                        hint=f"undefine it first: kvmrun pool undefine {name}")
    if type == "lvm":
        if directory is not None:
            raise PoolError("an lvm pool has no directory: its volumes are /dev/VG/NAME",
                            hint=f"kvmrun pool define {name} --type lvm --vg VGNAME")
        if not vg:
            raise PoolError("an lvm pool needs its volume group: --vg VGNAME",
                            hint="list them with: vgs")
        lvm.vg_report(vg)                          # the VG must exist (and LVM must work)
        record = {"type": "lvm", "vg": vg, "path": f"{lvm.DEV}/{vg}"}
    elif type == "dir":
        if vg is not None:
            raise PoolError("--vg is for lvm pools", hint="add --type lvm")
        if directory is None:
            raise PoolError("a directory pool needs its DIRECTORY",
                            hint=f"kvmrun pool define {name} DIRECTORY")
        target = Path(os.path.abspath(directory))
        if target.exists() and not target.is_dir():
            raise PoolError(f"{target} is not a directory")
        target.mkdir(parents=True, exist_ok=True)
        record = {"type": "dir", "path": str(target)}
    else:
        raise PoolError(f"unknown pool type {type!r}", hint="dir or lvm")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=1) + "\n", mode=0o644)
    return get(name)


def undefine(name: str) -> dict:
    pool = get(name)
    _file(name).unlink()
    return pool


def _check_volume(volume: str) -> None:
    if not re.fullmatch(VOLUME_RE, volume) or volume in (".", ".."):
        raise PoolError(f"{volume!r} is not a valid volume name",
                        hint="a file name: letters, digits and . _ + - (no slashes)",
                        key="volume")


def volume_path(pool: str, volume: str) -> str:
    _check_volume(volume)
    data = get(pool)
    if data.get("type") == "lvm":
        return f"{lvm.DEV}/{data['vg']}/{volume}"
    return os.path.join(data["path"], volume)


def resolve_disk(disk):
    """A profile disk given as pool + volume, with its path (and, on an lvm pool, format raw:
    a logical volume is a raw block device). Raises PoolError(key=the disk key at fault)."""
    pool = get(disk.pool)
    path = volume_path(disk.pool, disk.volume)
    if pool.get("type") != "lvm":
        return dataclasses.replace(disk, path=path)
    if disk.format not in (None, "raw"):
        raise PoolError(f"a volume of lvm pool {disk.pool!r} is a raw logical volume, "
                        f"not {disk.format}", hint="leave out format (or write format: raw)",
                        key="format")
    if disk.backing:
        raise PoolError("a logical volume cannot be a qcow2 overlay on a backing image",
                        hint="use a directory pool for overlays, or ephemeral: true",
                        key="backing")
    if disk.size:
        raise PoolError("lvm volumes are not made on first start",
                        hint=f"create it once: kvmrun disk create --pool {disk.pool} "
                             f"{disk.volume} --size 10G (and leave out size)", key="size")
    return dataclasses.replace(disk, path=path, format="raw")


def volumes(name: str) -> list[dict]:
    pool = get(name)
    if pool.get("type") == "lvm":
        return lvm.volumes(pool)
    root = Path(pool["path"])
    rows = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_file() or entry.name.startswith("."):
            continue
        try:
            info = images.info(str(entry))
        except KvmrunError:
            continue
        user = rundir.guest_using(str(entry))
        rows.append({"name": entry.name, "path": str(entry), "format": info["format"],
                     "virtual_size": info["virtual_size"], "actual_size": info["actual_size"],
                     "backing_file": info["backing_file"],
                     "in_use_by": user[0] if user else None})
    return rows


def usage(name: str) -> dict:
    pool = get(name)
    if pool.get("type") == "lvm":
        try:
            vg = lvm.vg_report(pool["vg"])
        except PoolError:
            return {**pool, "capacity": None, "free": None, "available": False}
        return {**pool, "capacity": vg["size"], "free": vg["free"], "available": True,
                "extent_size": vg["extent_size"]}
    try:
        st = os.statvfs(pool["path"])
        return {**pool, "capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
                "available": True}
    except OSError:
        return {**pool, "capacity": None, "free": None, "available": False}


# ---------------------------------------------------------------- volumes: create, delete

def create_volume(pool_name: str, volume: str, size: int | None, fmt: str | None = None,
                  backing: str | None = None) -> dict:
    """`kvmrun disk create --pool`: an image file in a dir pool, a logical volume in an lvm
    pool. Nothing is left behind when it fails."""
    pool = get(pool_name)
    path = volume_path(pool_name, volume)
    if pool.get("type") != "lvm":
        return images.create(path, size, fmt, backing)
    if fmt not in (None, "raw"):
        raise PoolError(f"volumes of lvm pool {pool_name!r} are raw logical volumes, "
                        f"not {fmt}", hint="leave out --format")
    if backing:
        raise PoolError("a logical volume cannot be an overlay on a backing image",
                        hint="use a directory pool for overlays")
    if size is None:
        raise PoolError(f"{volume}: give a size (--size 20G)")
    return lvm.lvcreate(pool, volume, size)


def delete_volume(pool_name: str | None, volume: str) -> dict:
    """`kvmrun disk delete`: remove a volume (an image file, or with an lvm pool a logical
    volume), refused while a running guest uses it."""
    pool = get(pool_name) if pool_name else None
    path = volume_path(pool_name, volume) if pool_name else os.path.abspath(volume)
    where = f" in pool {pool_name!r}" if pool_name else ""
    lv = None
    if pool and pool.get("type") == "lvm":
        lv = next((v for v in lvm.volumes(pool) if v["name"] == volume), None)
        if lv is None:
            raise PoolError(f"no volume {volume!r}{where} (volume group {pool['vg']})")
    elif not os.path.lexists(path):
        raise PoolError(f"no volume {volume!r}{where}" if pool_name
                        else f"no such disk image: {path}")
    elif not os.path.isfile(path) or os.path.islink(path):
        raise PoolError(f"{path} is not an image file", hint="kvmrun deletes image files and "
                                                             "the volumes of its pools only")
    user = rundir.guest_using(path)
    if user is not None:
        raise GuestError(f"{path} is in use by running guest {user[0]!r} (disk{user[1]})",
                         hint=f"stop it first: kvmrun stop {user[0]}")
    if lv is not None:
        if lv["open"]:
            raise PoolError(f"logical volume {pool['vg']}/{volume} is open (in use by another "
                            "program)", hint=f"see who has it: fuser -v {path}")
        lvm.lvremove(f"{pool['vg']}/{volume}")
    else:
        os.unlink(path)
    return {"pool": pool_name, "volume": volume, "path": path}


