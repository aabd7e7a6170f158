"""LVM volume groups as storage pools: driven through LVM's commands (vgs/lvs with JSON
reports, lvcreate, lvremove), C locale, no prompts; each failure is one plain error, and a
logical volume whose creation fails is not left behind."""

from __future__ import annotations

import json
import os
import re

from kvmrun import proc
from kvmrun.errors import HostError, KvmrunError, PoolError
from kvmrun.guest import rundir
from kvmrun.storage.images import human

VG_RE = r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*"          # what LVM accepts as a VG name
DEV = "/dev"                                        # LVM's device directory: DEV/VG/LV


def _lvm(*args: str, what: str, name: str, timeout: float = 120,
         ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run one LVM command (C locale, no prompts); a failure becomes a PoolError."""
    import subprocess         # here: every start reads the pools, few have an LVM one
    binary = proc.which(args[0]) or proc.which(args[0], path="/usr/sbin:/sbin")
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


def volumes(pool: dict) -> list[dict]:
    vg = pool["vg"]
    out = _lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
               "-o", "lv_name,lv_size,lv_attr", vg, what="cannot list", name=f"volume group {vg}")
    rows = []
    for lv in _report(out.stdout, "lv"):
        attr = lv.get("lv_attr", "")
        path = f"{DEV}/{vg}/{lv['lv_name']}"
        user = rundir.guest_using(path)
        rows.append({"name": lv["lv_name"], "path": path, "format": "raw",
                     "virtual_size": int(lv["lv_size"]), "actual_size": int(lv["lv_size"]),
                     "backing_file": None, "active": attr[4:5] == "a",
                     "open": attr[5:6] == "o", "in_use_by": user[0] if user else None})
    return rows


def lvcreate(pool: dict, volume: str, size: int) -> dict:
    vg, name = pool["vg"], f"{pool['vg']}/{volume}"
    group = vg_report(vg)
    if any(v["name"] == volume for v in volumes(pool)):
        raise PoolError(f"cannot create {name}: a logical volume of that name exists already",
                        hint=f"choose another name, or delete it: kvmrun disk delete --pool "
                             f"{pool['name']} {volume}")
    extents = -(-size // group["extent_size"])
    if extents * group["extent_size"] > group["free"]:
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
        lv = next((v for v in volumes(pool) if v["name"] == volume), None)
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
        return volumes(pool)
    except KvmrunError:
        return []


def lvremove(name: str) -> None:
    _lvm("lvremove", "--yes", "-f", name, what="cannot delete", name=name)


def _safe_remove(name: str) -> None:
    try:
        _lvm("lvremove", "--yes", "-f", name, what="cannot remove", name=name)
    except KvmrunError:
        pass
