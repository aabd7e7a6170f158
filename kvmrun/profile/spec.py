"""Small declarative value specs: one description drives validation, the typed model and the
JSON Schema (`kvmrun schema`).

A spec's `check(value, ctx, path)` returns the converted value or records an error in `ctx`
(with file, key path and line) and returns None; errors are collected so a user sees them all.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from collections.abc import Callable
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way
if TYPE_CHECKING:
    from typing import Any

from kvmrun import records
from kvmrun.errors import Location, ProfileError, ProfileErrors, close_matches, shown
from kvmrun.profile.yamlsrc import KeyPath, Lines
from kvmrun.records import record

COMMAND_LINE = "--set"
PATH_MAX, NAME_MAX = 4095, 255     # Linux: longer gives ENAMETOOLONG


class Ctx:
    """Validation context: source lines and collected errors."""

    def __init__(self, lines: Lines, default_file: str):
        self.lines = lines
        self.default_file = default_file
        self.errors: list[ProfileError] = []

    def loc(self, path: KeyPath) -> Location:
        probe = path
        while probe not in self.lines and probe:
            probe = probe[:-1]
        file, line = self.lines.get(probe, (self.default_file, None))
        return Location(file, path, line)

    def base_dir(self, path: KeyPath) -> Path:
        file = self.loc(path).file
        return Path.cwd() if file.startswith(COMMAND_LINE) else Path(file).resolve().parent

    def error(self, path: KeyPath, message: str, hint: str | None = None) -> None:
        self.errors.append(ProfileError(self.loc(path), message, hint))

    def raise_errors(self) -> None:
        if self.errors:
            raise ProfileErrors(sorted(self.errors, key=lambda e: (e.location.file,
                                                                   e.location.line or 0)))


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value),
                                                                        type(value).__name__)


def suggest(word: str, choices: list[str]) -> str:
    match = close_matches(str(word), choices)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Spec:
    doc = ""

    def check(self, value: Any, ctx: Ctx, path: KeyPath) -> Any:
        raise NotImplementedError

    def schema(self) -> dict:
        raise NotImplementedError


@record
class Str(Spec):
    pattern: str | None = None
    max_len: int | None = None
    what: str = "a string"

    def check(self, value, ctx, path):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return ctx.error(path, f"expected {self.what}, found {type_name(value)}")
        value = str(value)
        if "\0" in value:              # no argument to a process can carry one
            return ctx.error(path, f"{shown(value)} contains a NUL character")
        if self.max_len and len(value) > self.max_len:
            return ctx.error(path, f"{shown(value)} is longer than {self.max_len} characters")
        if self.pattern and not re.fullmatch(self.pattern, value):
            return ctx.error(path, f"{shown(value)} is not {self.what}")
        return value

    def schema(self):
        out: dict[str, Any] = {"type": "string"}
        if self.pattern:
            out["pattern"] = f"^{self.pattern}$"
        if self.max_len:
            out["maxLength"] = self.max_len
        return out


@record
class Enum(Spec):
    choices: tuple[str, ...]

    def check(self, value, ctx, path):
        if str(value) not in self.choices or isinstance(value, (bool, dict, list)):
            return ctx.error(path, f"{shown(value)} is not one of {', '.join(self.choices)}"
                             + suggest(str(value), list(self.choices)))
        return str(value)

    def schema(self):
        return {"enum": list(self.choices)}


@record
class Int(Spec):
    min: int
    max: int

    def check(self, value, ctx, path):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
                value = int(value)
            else:
                return ctx.error(path, f"expected a whole number, found {shown(value)}")
        if not self.min <= value <= self.max:
            return ctx.error(path, f"{value} is out of range ({self.min} to {self.max})")
        return value

    def schema(self):
        return {"type": "integer", "minimum": self.min, "maximum": self.max}


@record
class Percent(Spec):
    """A whole percentage, written 150% (or 150)."""

    min: int
    max: int

    def check(self, value, ctx, path):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value                     # never str(): a 5,000-digit int cannot be
        else:
            m = re.fullmatch(r"([0-9]{1,7})\s*%?", value.strip(), re.ASCII) \
                if isinstance(value, str) else None
            if not m:
                return ctx.error(path, f"expected a percentage like 50% or 200%, found "
                                       f"{shown(value)}")
            number = int(m.group(1))
        if not self.min <= number <= self.max:
            return ctx.error(path, f"{shown(value)} is out of range ({self.min}% to "
                                   f"{self.max}%)")
        return number

    def schema(self):
        return {"anyOf": [{"type": "integer", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": r"^[0-9]{1,7}\s*%?$"}]}


class Bool(Spec):
    def check(self, value, ctx, path):
        if not isinstance(value, bool):
            return ctx.error(path, f"expected true or false, found {shown(value)}")
        return value

    def schema(self):
        return {"type": "boolean"}


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_UNIT_MIB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_size_mib(value: Any) -> float | None:
    """512 -> 512, '512M' -> 512, '2G' -> 2048, '1.5G' -> 1536; None if not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if isinstance(value, float) and not math.isfinite(value) or (
            len(text) > 40 and text[:1].isascii() and text[:1].isdigit()):
        return math.inf                   # far out of any range: '9' * 400 + 'M'
    m = _SIZE_RE.fullmatch(text)
    if not m:
        return None
    return float(m.group(1)) * _UNIT_MIB[m.group(2).upper()]


@record
class Size(Spec):
    """A size in MiB: an integer (MiB) or a string like 512M, 2G, 1.5G."""

    min: int
    max: int

    def check(self, value, ctx, path):
        mib = parse_size_mib(value)
        if mib is None:
            return ctx.error(path, f"{shown(value)} is not a size",
                             hint="use MiB as a number (2048) or a size with a unit: 512M, 2G")
        if isinstance(mib, float) and math.isinf(mib):
            return ctx.error(path, f"{shown(value)} is out of range ({self.min} MiB to "
                                   f"{self.max // (1024 * 1024)} TiB)")
        if mib != int(mib):
            return ctx.error(path, f"{shown(value)} is not a whole number of MiB")
        if not self.min <= mib <= self.max:
            return ctx.error(path, f"{shown(value)} is out of range ({self.min} MiB to "
                                   f"{self.max // (1024 * 1024)} TiB)")
        return int(mib)

    def schema(self):
        pattern = r"^\d+(\.\d+)?\s*[KkMmGgTt]?([iI]?[bB])?$"    # as _SIZE_RE, ignoring case
        return {"anyOf": [{"type": "integer", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": pattern}]}


@record
class FilePath(Spec):
    """A path; relative paths resolve against the directory of the file that set them.
    Symbolic links are kept as written: QEMU opens the path the user named."""

    def check(self, value, ctx, path):
        if not isinstance(value, str) or not value:
            return ctx.error(path, f"expected a file path, found {type_name(value)}")
        if "\0" in value:
            return ctx.error(path, f"{shown(value)} contains a NUL character")
        if len(os.fsencode(value)) > PATH_MAX or any(
                len(os.fsencode(part)) > NAME_MAX for part in value.split("/")):
            return ctx.error(path, f"{shown(value)} is longer than a path can be "
                                   f"({NAME_MAX} bytes a name, {PATH_MAX} in all)")
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            return ctx.error(path, f"{shown(value)} names an unknown user's home directory")
        return os.path.normpath(ctx.base_dir(path) / expanded)

    def schema(self):
        return {"type": "string", "minLength": 1}


@record
class Either(Spec):
    """The first spec whose `accepts(value)` is true checks the value."""

    options: tuple[tuple[Callable[[Any], bool], Spec], ...]
    what: str

    def check(self, value, ctx, path):
        for accepts, spec in self.options:
            if accepts(value):
                return spec.check(value, ctx, path)
        return ctx.error(path, f"expected {self.what}, found {type_name(value)}")

    def schema(self):
        return {"anyOf": [spec.schema() for _, spec in self.options]}


@record
class List(Spec):
    item: Spec
    scalar_ok: bool = False       # a single value stands for a one-item list

    def check(self, value, ctx, path):
        if self.scalar_ok and not isinstance(value, (list, dict)) and value is not None:
            value = [value]
        if value is None:
            return ()
        if not isinstance(value, list):
            return ctx.error(path, f"expected a list, found {type_name(value)}")
        return tuple(self.item.check(v, ctx, path + (i,)) for i, v in enumerate(value))

    def schema(self):
        out = {"type": "array", "items": self.item.schema()}
        return {"anyOf": [out, self.item.schema()]} if self.scalar_ok else out


@record
class Field:
    spec: Spec
    doc: str
    required: bool = False


def defaults(cls: type) -> dict[str, Any]:
    """The plain defaults of a record class (factories excluded)."""
    return {f.name: f.default for f in records.fields(cls)
            if f.default is not records.MISSING}


@record
class Obj(Spec):
    """A mapping with known keys, built into the frozen record class `cls`."""

    cls: type
    fields: dict[str, Field]
    doc: str = ""

    def check(self, value, ctx, path):
        if not isinstance(value, dict):
            return ctx.error(path, f"expected a mapping of keys, found {type_name(value)}")
        out: dict[str, Any] = {}
        for key in value:
            if key not in self.fields:
                ctx.error(path + (key,), "unknown key" + suggest(key, list(self.fields)),
                          hint="known keys: " + ", ".join(self.fields))
        for key, field in self.fields.items():
            if key in value and value[key] is not None:
                out[key] = field.spec.check(value[key], ctx, path + (key,))
            elif field.required:
                ctx.error(path, f"missing required key {key!r}")
        if ctx.errors:
            return None
        attrs = {f.name for f in records.fields(self.cls)}
        return self.cls(**{k: v for k, v in out.items() if k in attrs})

    def schema(self):
        props = {}
        plain = defaults(self.cls)
        for key, field in self.fields.items():
            props[key] = {"description": field.doc, **field.spec.schema()}
            default = plain.get(key)
            if isinstance(default, (str, int)) or (isinstance(default, tuple) and default
                                                   and isinstance(default[0], str)):
                props[key]["default"] = list(default) if isinstance(default, tuple) else default
        out = {"type": "object", "properties": props, "additionalProperties": False}
        required = [k for k, f in self.fields.items() if f.required]
        if required:
            out["required"] = required
        if self.doc:
            out["description"] = self.doc
        return out
