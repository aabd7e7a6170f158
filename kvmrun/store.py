"""Defined VMs: named profiles kept in the config directory (the `virsh define` of kvmrun).

A defined VM is a self-contained profile file `<config_dir>/vms/<name>.yaml`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from kvmrun import paths
from kvmrun.errors import Location, ProfileError
from kvmrun.profile import NAME_RE, Profile, load


def vm_dir() -> Path:
    return paths.config_dir() / "vms"


def defined_path(name: str) -> Path:
    return vm_dir() / f"{name}.yaml"


def is_defined(name: str) -> bool:
    return bool(re.fullmatch(NAME_RE, name)) and defined_path(name).is_file()


def resolve(ref: str, overrides: Sequence[str] = ()) -> Profile:
    """A PROFILE argument: a profile file, or the name of a defined VM."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or "/" in ref or path.is_file():
        return load(path, overrides)
    if is_defined(ref):
        return load(defined_path(ref), overrides)
    raise ProfileError(Location(ref), "no such profile file or defined VM",
                       hint="give a path to a .yaml profile, or see `kvmrun list --defined`")
