"""Storage pools, like libvirt's `dir` and `logical` pools. A pool is a small JSON file in
$KVMRUN_CONFIG_DIR/pools/NAME.json of one of three types:

  dir   a directory; its volumes are the image files in it (qcow2 or raw)
  lvm   an LVM volume group; its volumes are logical volumes, /dev/VG/VOLUME, always raw
        (driven by kvmrun.storage.lvm)
  nfs   an NFS export, mounted (access kernel) or opened by QEMU itself as nfs:// URLs
        (access userspace); see kvmrun.storage.nfs

Profiles name a volume with `pool:` + `volume:` (see `resolve_disk`); every failure is one
plain `PoolError`, and a volume whose creation fails is not left behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvmrun import records
from kvmrun.errors import GuestError, KvmrunError, PoolError
from kvmrun.files import atomic_write
from kvmrun.guest import rundir
from kvmrun.paths import NAME_RE, config_dir
from kvmrun.storage import images, lvm
from kvmrun.storage import nfs as nfsmod

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
           vg: str | None = None, nfs: dict | None = None) -> dict:
    """Define a pool: `directory` for a dir pool (made if missing), `vg` (an existing LVM
    volume group) for an lvm pool, `nfs` (source, mount_dir, options, access) for an nfs
    pool."""
    path = _file(name)
    if path.exists():
        pool = get(name)
        raise PoolError(f"pool {name!r} is already defined ({pool['path']})",
                        hint=f"undefine it first: kvmrun pool undefine {name}")
    if nfs and type != "nfs":
        raise PoolError("--source, --mount-dir, --options and --access are for nfs pools",
                        hint="add --type nfs")
    if type == "nfs":
        if directory is not None or vg is not None:
            raise PoolError("an nfs pool is given by its export, not a directory or VG",
                            hint=f"kvmrun pool define {name} --type nfs --source "
                                 "SERVER:/EXPORT")
        record = nfsmod.record(name, **(nfs or {}))
    elif type == "lvm":
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
        raise PoolError(f"unknown pool type {type!r}", hint="dir, lvm or nfs")
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
    if data.get("type") == "nfs":
        return nfsmod.volume_path(data, volume)
    return os.path.join(data["path"], volume)


def resolve_disk(disk):
    """A profile disk given as pool + volume, with its path (and, on an lvm pool, format raw:
    a logical volume is a raw block device). Raises PoolError(key=the disk key at fault)."""
    pool = get(disk.pool)
    path = volume_path(disk.pool, disk.volume)
    if pool.get("type") != "lvm":
        return records.replace(disk, path=path)
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
    return records.replace(disk, path=path, format="raw")


def volumes(name: str) -> list[dict]:
    pool = get(name)
    if pool.get("type") == "lvm":
        return lvm.volumes(pool)
    if pool.get("type") == "nfs":
        entries = [f["path"] for f in nfsmod.files(pool)]
    else:
        root = Path(pool["path"])
        entries = [str(e) for e in (sorted(root.iterdir()) if root.is_dir() else [])
                   if e.is_file() and not e.name.startswith(".")]
    rows = []
    for entry in entries:
        try:
            info = images.info(entry)
        except KvmrunError:
            continue
        user = rundir.guest_using(entry)
        rows.append({"name": entry.rsplit("/", 1)[-1], "path": entry, "format": info["format"],
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
    if pool.get("type") == "nfs":
        return {**pool, **nfsmod.usage(pool)}
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
    if pool.get("type") == "nfs" and backing and "/" not in backing:
        backing = volume_path(pool_name, backing)      # a volume of the same pool
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
    elif nfsmod.is_url(path):
        if not nfsmod.exists(path):
            raise PoolError(f"no volume {volume!r}{where}")
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
        images.unlink(path, missing_ok=False)
    return {"pool": pool_name, "volume": volume, "path": path}


# ---------------------------------------------------------------- start / stop (nfs kernel)

def start(name: str) -> str:
    """`kvmrun pool start`: mount a kernel-access nfs pool; check any other pool."""
    pool = get(name)
    if pool.get("type") == "nfs" and pool["access"] == "kernel":
        done = nfsmod.mount(pool)
        return (f"{'mounted' if done else 'already mounted:'} {pool['source']} at "
                f"{pool['mount_dir']}")
    if not usage(name)["available"]:
        volumes(name)                                # raises the reason
        raise PoolError(f"pool {name!r} is not available ({pool['path']})")
    return f"pool {name} is available (nothing to mount: {pool['path']})"


def stop(name: str) -> str:
    """`kvmrun pool stop`: unmount a kernel-access nfs pool no running guest uses."""
    pool = get(name)
    if not (pool.get("type") == "nfs" and pool["access"] == "kernel"):
        return f"pool {name} has nothing to unmount"
    if nfsmod.mounted(pool["mount_dir"]):
        for v in volumes(name):
            user = rundir.guest_using(v["path"])
            if user:
                raise GuestError(f"{v['path']} is in use by running guest {user[0]!r}",
                                 hint=f"stop it first: kvmrun stop {user[0]}")
    done = nfsmod.umount(pool)
    return f"{'unmounted' if done else 'not mounted:'} {pool['mount_dir']}"
