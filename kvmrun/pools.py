"""Storage pools: named directories that hold disk images (volumes), like libvirt's `dir`
pools. A pool is a small JSON file in $KVMRUN_CONFIG_DIR/pools/NAME.json; its volumes are
the image files in its directory. Profiles name a volume with `pool:` + `volume:`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvmrun.errors import KvmrunError
from kvmrun.paths import config_dir

NAME_RE = r"[A-Za-z0-9]+([._-][A-Za-z0-9]+)*"
VOLUME_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]*"


class PoolError(KvmrunError):
    pass


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


def define(name: str, directory: str) -> dict:
    path = _file(name)
    if path.exists():
        raise PoolError(f"pool {name!r} is already defined ({get(name)['path']})",
                        hint=f"undefine it first: kvmrun pool undefine {name}")
    target = Path(os.path.abspath(directory))
    if target.exists() and not target.is_dir():
        raise PoolError(f"{target} is not a directory")
    target.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"type": "dir", "path": str(target)}, indent=1) + "\n")
    os.replace(tmp, path)
    return get(name)


def undefine(name: str) -> dict:
    pool = get(name)
    _file(name).unlink()
    return pool


def volume_path(pool: str, volume: str) -> str:
    if not re.fullmatch(VOLUME_RE, volume):
        raise PoolError(f"{volume!r} is not a valid volume name",
                        hint="a file name: letters, digits and . _ + - (no slashes)")
    return os.path.join(get(pool)["path"], volume)


def volumes(name: str) -> list[dict]:
    from kvmrun import storage
    root = Path(get(name)["path"])
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
    try:
        st = os.statvfs(pool["path"])
        return {**pool, "capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
                "available": True}
    except OSError:
        return {**pool, "capacity": None, "free": None, "available": False}
