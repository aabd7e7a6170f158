"""Storage pools, like libvirt's `dir` and `logical` pools. A pool is a small JSON file in
$KVMRUN_CONFIG_DIR/pools/NAME.json of one of two types:

  dir   a directory; its volumes are the image files in it (qcow2 or raw)
  lvm   an LVM volume group; its volumes are logical volumes, /dev/VG/VOLUME, always raw

Profiles name a volume with `pool:` + `volume:` (see `resolve_disk`). LVM is driven through
its commands (vgs/lvs with JSON reports, lvcreate, lvremove), each failure turned into one
plain `PoolError`; a volume whose creation fails is not left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from kvmrun.errors import GuestError, HostError, KvmrunError
from kvmrun.paths import config_dir
from kvmrun.runtime import atomic_write

NAME_RE = r"[A-Za-z0-9]+([._-][A-Za-z0-9]+)*"
VOLUME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
VG_RE = r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*"          # what LVM accepts as a VG name
TYPES = ("dir", "lvm")
DEV = "/dev"                                        # LVM's device directory: DEV/VG/LV


class PoolError(KvmrunError):
    """A pool or volume operation failed; `key` is the profile disk key it is about."""

    def __init__(self, message: str, hint: str | None = None, key: str = "pool"):
        super().__init__(message, hint)
        self.key = key


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
        vg_report(vg)                          # the VG must exist (and LVM must work)
        record = {"type": "lvm", "vg": vg, "path": f"{DEV}/{vg}"}
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
        return f"{DEV}/{data['vg']}/{volume}"
    return os.path.join(data["path"], volume)


def resolve_disk(disk):
    """A profile disk given as pool + volume, with its path (and, on an lvm pool, format raw:
    a logical volume is a raw block device). Raises PoolError(key=the disk key at fault)."""
    import dataclasses
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
    from kvmrun import storage
    pool = get(name)
    if pool.get("type") == "lvm":
        return _lvm_volumes(pool)
    root = Path(pool["path"])
    rows = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.is_file() or entry.name.startswith("."):
            continue
        try:
            info = storage.info(str(entry))
        except KvmrunError:
            continue
        user = storage.guest_using(str(entry))
        rows.append({"name": entry.name, "path": str(entry), "format": info["format"],
                     "virtual_size": info["virtual_size"], "actual_size": info["actual_size"],
                     "backing_file": info["backing_file"],
                     "in_use_by": user[0] if user else None})
    return rows


def usage(name: str) -> dict:
    pool = get(name)
    if pool.get("type") == "lvm":
        try:
            vg = vg_report(pool["vg"])
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
    from kvmrun import storage
    pool = get(pool_name)
    path = volume_path(pool_name, volume)
    if pool.get("type") != "lvm":
        return storage.create(path, size, fmt, backing)
    if fmt not in (None, "raw"):
        raise PoolError(f"volumes of lvm pool {pool_name!r} are raw logical volumes, "
                        f"not {fmt}", hint="leave out --format")
    if backing:
        raise PoolError("a logical volume cannot be an overlay on a backing image",
                        hint="use a directory pool for overlays")
    if size is None:
        raise PoolError(f"{volume}: give a size (--size 20G)")
    return _lvcreate(pool, volume, size)


def delete_volume(pool_name: str | None, volume: str) -> dict:
    """`kvmrun disk delete`: remove a volume (an image file, or with an lvm pool a logical
    volume), refused while a running guest uses it."""
    from kvmrun import storage
    pool = get(pool_name) if pool_name else None
    path = volume_path(pool_name, volume) if pool_name else os.path.abspath(volume)
    where = f" in pool {pool_name!r}" if pool_name else ""
    lv = None
    if pool and pool.get("type") == "lvm":
        lv = next((v for v in _lvm_volumes(pool) if v["name"] == volume), None)
        if lv is None:
            raise PoolError(f"no volume {volume!r}{where} (volume group {pool['vg']})")
    elif not os.path.lexists(path):
        raise PoolError(f"no volume {volume!r}{where}" if pool_name
                        else f"no such disk image: {path}")
    elif not os.path.isfile(path) or os.path.islink(path):
        raise PoolError(f"{path} is not an image file", hint="kvmrun deletes image files and "
                                                             "the volumes of its pools only")
    user = storage.guest_using(path)
    if user is not None:
        raise GuestError(f"{path} is in use by running guest {user[0]!r} (disk{user[1]})",
                         hint=f"stop it first: kvmrun stop {user[0]}")
    if lv is not None:
        if lv["open"]:
            raise PoolError(f"logical volume {pool['vg']}/{volume} is open (in use by another "
                            "program)", hint=f"see who has it: fuser -v {path}")
        _lvm("lvremove", "--yes", "-f", f"{pool['vg']}/{volume}", what="cannot delete",
             name=f"{pool['vg']}/{volume}")
    else:
        os.unlink(path)
    return {"pool": pool_name, "volume": volume, "path": path}


# ---------------------------------------------------------------- LVM

def _lvm(*args: str, what: str, name: str, timeout: float = 120,
         ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run one LVM command (C locale, no prompts); a failure becomes a PoolError."""
    binary = shutil.which(args[0]) or shutil.which(args[0], path="/usr/sbin:/sbin")
    if not binary:
        raise HostError(f"{args[0]} not found: LVM tools are not installed",
                        hint="apt-get install lvm2")
    env = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
    try:
        out = subprocess.run([binary, *args[1:]], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired as err:
        raise PoolError(f"{what} {name}: {args[0]} did not finish in {timeout:g}s") from err
    if out.returncode not in ok_codes:
        raise explain_lvm(out.stderr, what, name)
    return out


def explain_lvm(stderr: str, what: str, name: str) -> KvmrunError:
    """LVM's stderr as one clear error."""
    lines = [line.strip() for line in stderr.strip().splitlines()
             if line.strip() and not line.strip().startswith(("WARNING: Running as a non-root",
                                                             "File descriptor"))]
    text = "; ".join(lines) or "no message"
    low = text.lower()
    m = re.search(r'volume group "?([^"\s]+)"? not found', text, re.IGNORECASE)
    if m:
        return PoolError(f"{what} {name}: LVM volume group {m.group(1)!r} does not exist",
                         hint="list volume groups with: vgs (make one: vgcreate VG DEVICE)")
    if "insufficient free space" in low or "insufficient suitable" in low:
        return PoolError(f"{what} {name}: not enough free space in the volume group ({text})",
                         hint="free space shows in: kvmrun pool info NAME")
    if "already exists" in low:
        return PoolError(f"{what} {name}: a logical volume of that name exists already",
                         hint="choose another name (kvmrun pool info NAME lists them)")
    if "device-mapper" in low or "/dev/mapper/control" in low:
        return HostError(f"{what} {name}: the kernel's device-mapper is not available, so "
                         "LVM cannot create or activate logical volumes",
                         hint="load it: modprobe dm_mod (in a container, the host kernel "
                              "must provide it)")
    if "permission denied" in low or "non-root" in stderr.lower():
        return HostError(f"{what} {name}: LVM needs root ({text})",
                         hint="run kvmrun as root for lvm pools")
    if " in use" in low or "is open" in low:
        return PoolError(f"{what} {name}: the logical volume is in use ({text})",
                         hint="stop the guest or program that has it open")
    if "invalid" in low or "reserved" in low or "not allowed" in low:
        return PoolError(f"{what} {name}: LVM refuses the name ({text})",
                         hint="LVM names: letters, digits and + _ . - ; not 'snapshot' or "
                              "'pvmove' in them, nor an _rimage/_tdata-like ending")
    return PoolError(f"{what} {name}: {text}")


def _report(out: str, kind: str) -> list[dict]:
    try:
        return json.loads(out)["report"][0][kind]
    except (ValueError, KeyError, IndexError) as err:
        raise PoolError(f"cannot read LVM's {kind} report: {out[:200]!r}") from err


def vg_report(vg: str) -> dict:
    """Size, free space and extent size (bytes) of a volume group; a PoolError if it does
    not exist."""
    if not re.fullmatch(VG_RE, vg):
        raise PoolError(f"{vg!r} is not a valid LVM volume group name",
                        hint="letters, digits and + _ . - (not starting with -)")
    out = _lvm("vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", "vg_name,vg_size,vg_free,vg_extent_size,lv_count", vg,
               what="cannot read", name=f"volume group {vg}")
    rows = _report(out.stdout, "vg")
    if not rows:
        raise PoolError(f"LVM volume group {vg!r} does not exist",
                        hint="list volume groups with: vgs")
    row = rows[0]
    return {"vg": row["vg_name"], "size": int(row["vg_size"]), "free": int(row["vg_free"]),
            "extent_size": int(row["vg_extent_size"]), "lv_count": int(row["lv_count"])}


def _lvm_volumes(pool: dict) -> list[dict]:
    from kvmrun import storage
    vg = pool["vg"]
    out = _lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", "lv_name,lv_size,lv_attr", vg, what="cannot list", name=f"volume group {vg}")
    rows = []
    for lv in _report(out.stdout, "lv"):
        attr = lv.get("lv_attr", "")
        path = f"{DEV}/{vg}/{lv['lv_name']}"
        user = storage.guest_using(path)
        rows.append({"name": lv["lv_name"], "path": path, "format": "raw",
                     "virtual_size": int(lv["lv_size"]), "actual_size": int(lv["lv_size"]),
                     "backing_file": None, "active": attr[4:5] == "a",
                     "open": attr[5:6] == "o", "in_use_by": user[0] if user else None})
    return rows


def _lvcreate(pool: dict, volume: str, size: int) -> dict:
    vg, name = pool["vg"], f"{pool['vg']}/{volume}"
    group = vg_report(vg)
    if any(v["name"] == volume for v in _lvm_volumes(pool)):
        raise PoolError(f"cannot create {name}: a logical volume of that name exists already",
                        hint=f"choose another name, or delete it: kvmrun disk delete --pool "
                             f"{pool['name']} {volume}")
    extents = -(-size // group["extent_size"])
    if extents * group["extent_size"] > group["free"]:
        from kvmrun.storage import human
        raise PoolError(f"cannot create {name}: not enough free space in volume group {vg} "
                        f"({human(size)} asked, {human(group['free'])} free)",
                        hint="choose a smaller size, or extend the volume group (vgextend)")
    try:
        _lvm("lvcreate", "--yes", "--wipesignatures", "y", "-L", f"{size}b", "-n", volume, vg,
             what="cannot create", name=name, timeout=300)
    except BaseException as err:
        # LVM undoes a creation it cannot finish, but an interrupted lvcreate may have made
        # the volume: take it away again -- unless the name was taken meanwhile (not ours)
        taken = isinstance(err, PoolError) and "exists already" in err.message
        if not taken and any(v["name"] == volume for v in _safe_volumes(pool)):
            _safe_remove(name)
        raise
    try:
        lv = next((v for v in _lvm_volumes(pool) if v["name"] == volume), None)
        if lv is None:
            raise PoolError(f"lvcreate reported success, but {name} is not there")
        if not os.path.exists(lv["path"]):
            raise PoolError(f"{name} was made, but its device {lv['path']} did not appear",
                            hint="is udev running? (vgmknodes makes the device nodes)")
    except BaseException:
        _safe_remove(name)
        raise
    return {"path": lv["path"], "format": "raw", "virtual_size": lv["virtual_size"],
            "actual_size": lv["virtual_size"], "backing_file": None, "pool": pool["name"],
            "volume": volume, "vg": vg}


def _safe_volumes(pool: dict) -> list[dict]:
    try:
        return _lvm_volumes(pool)
    except KvmrunError:
        return []


def _safe_remove(name: str) -> None:
    try:
        _lvm("lvremove", "--yes", "-f", name, what="cannot remove", name=name)
    except KvmrunError:
        pass
