"""Loading a profile: one YAML file (following `extends:`), `--set key.path=value`
overrides and one-off flags, validated into an immutable, typed `Profile`. Every error names
the file, the key path and the line. No I/O beyond reading the profile files.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from collections.abc import Sequence
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way
if TYPE_CHECKING:
    from typing import Any

import yaml

from kvmrun import records
from kvmrun.errors import Location, ProfileError, shown
from kvmrun.paths import NAME_RE
from kvmrun.profile.keys import PROFILE
from kvmrun.profile.model import Profile
from kvmrun.profile.rules import check_combinations
from kvmrun.profile.spec import COMMAND_LINE, Ctx, List, Obj, Spec, defaults, type_name
from kvmrun.profile.yamlsrc import KeyPath, Lines, load_yaml, parse_scalar

ONE_OFF = "command line"


def load(source: str | Path, overrides: Sequence[str] = (), *, display: str | None = None,
         extra: dict | None = None) -> Profile:
    """Load a profile file, follow `extends`, lay `extra` (one-off flags, already profile
    keys) over it, apply `--set` overrides, and validate once."""
    path = Path(source)
    data, lines = read(path, display)
    if extra:
        data.update(extra)
        lines.update({(key,): (ONE_OFF, None) for key in extra})
    return from_mapping(data, lines, display or str(source), overrides, source=str(path))


def read(path: Path, display: str | None = None) -> tuple[dict, Lines]:
    """A profile file's mapping with `extends` resolved and the lines of every key (the
    name defaults to the file name)."""
    data, lines = _load_with_extends(path, display or str(path), [])
    if "name" not in data:
        stem = path.name.removesuffix(".yaml").removesuffix(".yml")
        if re.fullmatch(NAME_RE, stem):
            data["name"] = stem
    return data, lines


def from_mapping(data: Any, lines: Lines, display: str, overrides: Sequence[str] = (),
                 source: str | None = None) -> Profile:
    """Validate a mapping (from YAML or command-line flags) into a Profile."""
    data = copy.deepcopy(data)
    lines = dict(lines)
    for assignment in overrides:
        apply_set(data, lines, assignment)
    ctx = Ctx(lines, display)
    if not isinstance(data, dict):
        raise ProfileError(Location(display, line=lines.get((), (None, None))[1]),
                           f"a profile must be a mapping of keys, found {type_name(data)}")
    data.pop("extends", None)
    profile = PROFILE.check(data, ctx, ())
    if profile is not None:
        check_combinations(profile, ctx)
    ctx.raise_errors()
    if profile.firmware == "uefi-secure":         # one spelling in the model
        profile = records.replace(profile, firmware="uefi", secure_boot=True)
    return records.replace(profile, source=source, lines=lines)


def _load_with_extends(path: Path, display: str, stack: list[Path]) -> tuple[dict, Lines]:
    data, lines = load_yaml(path, display)
    if not isinstance(data, dict):
        raise ProfileError(Location(display, line=1),
                           f"a profile must be a mapping of keys, found {type_name(data)}")
    base_ref = data.get("extends")
    if base_ref is None:
        return data, lines
    where = Location(display, ("extends",), lines[("extends",)][1])
    if not isinstance(base_ref, str) or not base_ref or "\0" in base_ref:
        raise ProfileError(where, "expected a file path")
    try:
        base_path = (path.resolve().parent / os.path.expanduser(base_ref)).resolve()
        chain = stack + [path.resolve()]
        if base_path in chain:
            loop = " -> ".join(p.name for p in chain + [base_path])
            raise ProfileError(where, f"extends loop: {loop}")
        if not base_path.is_file():
            raise ProfileError(where, f"base profile {str(base_path)!r} "
                               + ("is not a file" if base_path.exists() else "not found"))
    except OSError as err:          # a name too long, a loop of links, no permission
        raise ProfileError(where, f"cannot open base profile {shown(base_ref)}: "
                                  f"{err.strerror}") from None
    base, base_lines = _load_with_extends(base_path, str(base_path), chain)
    base.pop("name", None)          # a VM's name is its own, never inherited
    del data["extends"]
    # values this file replaces take its lines; the rest keep the base's (and so a base's
    # relative paths resolve against the base's directory)
    merged_lines = {k: v for k, v in base_lines.items() if not _replaces(data, k)}
    merged_lines.update(lines)
    return _merge(base, data), merged_lines


def _replaces(over: dict, key: KeyPath) -> bool:
    """Whether merging `over` onto a base replaces the base's value at `key` (mappings merge
    key by key, anything else is replaced whole)."""
    node: Any = over
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return True


def _merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return over


def apply_set(data: dict, lines: Lines, assignment: str) -> None:
    """Apply `key.path=value` (value parsed as YAML) in place; indexes are numbers."""
    where = f"{COMMAND_LINE} {assignment if len(assignment) <= 80 else assignment[:79] + '…'}"
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ProfileError(Location(where), "expected KEY=VALUE, e.g. memory=4G or "
                                            "disks.0.cache=unsafe")
    try:
        value = parse_scalar(raw, where) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p
                              for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part > len(node):
                raise ProfileError(Location(where, tuple(parts[: i + 1])),
                                   f"no item {part} in a list of {len(node)}")
            if part == len(node):
                node.append({} if not last else None)
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise ProfileError(Location(where, tuple(parts[: i + 1])),
                                   "not a list, cannot index it with a number")
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(parts[i + 1], int) else {}
        else:
            raise ProfileError(Location(where, tuple(parts[:i])), "is not a mapping or list")
        if last:
            node[part] = value
        else:
            node = node[part]
    prefix = tuple(parts)
    for existing in [k for k in lines if k[: len(prefix)] == prefix]:
        del lines[existing]
    lines[prefix] = (where, None)


def to_dict(profile: Profile) -> dict:
    """A self-contained mapping of the profile (defaults omitted, paths absolute): the
    `virsh dumpxml` of kvmrun. Loading it back gives an equal Profile."""
    return _strip(profile, PROFILE)


def _strip(obj: Any, spec: Spec) -> Any:
    if isinstance(spec, Obj):
        out = {}
        plain = defaults(spec.cls)
        for key, fld in spec.fields.items():
            value = getattr(obj, key, None)
            if value is None or (key in plain and value == plain[key]):
                continue
            out[key] = _strip(value, fld.spec)
        return out
    if isinstance(spec, List):
        return [_strip(v, spec.item) for v in obj]
    return obj


def json_schema() -> dict:
    schema = PROFILE.schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kvmrun profile"
    return schema
