"""Plain parameters without pydantic: keeps `kvmrun status`, `list` … near typer's own floor.

typer (0.2x) coerces each parameter value through a pydantic TypeAdapter that it builds
lazily, the first time that parameter's value is processed; the first one imports pydantic,
which costs more than Python and typer together (see the README's Performance section). Every
kvmrun verb has at least one such parameter (the global `--run-dir`, a NAME), so every call
paid for it. Yet kvmrun's parameters are strings, lists of strings, bools, and a few ints and
floats: values the command line already hands over as the right type or as plain digits.

`install()` makes typer's lazily built coercer of those parameters a tiny one that returns such values as they are (or converted with int()/float() when they are plain
digits) and hands anything else to typer's own coercer, so edge cases, errors and their
messages stay typer's. It relies on typer internals (`_TyperParameter.get_runtime_param`,
`._runtime_param`, `.type_descriptor`); with a typer that lacks them it changes nothing, and
tests/unit/test_lazy_imports.py notices when a typer upgrade brings pydantic back.
"""

from __future__ import annotations

import re
from typing import Any, List

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _kind(annotation: Any) -> str | None:
    if annotation in (str, int, float, bool):
        return annotation.__name__
    if annotation == List[str] or annotation == list[str]:
        return "list"
    return None


class PlainParam:
    """Duck-types typer's RuntimeParam.coerce for plain values; delegates the rest."""

    __slots__ = ("kind", "_typer")

    def __init__(self, kind: str):
        self.kind = kind
        self._typer = None

    def _fast(self, value: Any, multi: bool) -> tuple[bool, Any]:
        kind = self.kind
        if multi:
            if kind == "list" and isinstance(value, (list, tuple)) and all(
                    type(v) is str for v in value):
                return True, list(value)
            return False, None
        if kind == "str" and type(value) is str:
            return True, value
        if kind == "bool" and type(value) is bool:
            return True, value
        if kind == "int":
            if type(value) is int:
                return True, value
            if type(value) is str and _INT.fullmatch(value):
                return True, int(value)
        if kind == "float":
            if type(value) in (int, float):
                return True, float(value)
            if type(value) is str and _FLOAT.fullmatch(value):
                return True, float(value)
        return False, None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:                      # as typer's RuntimeParam.coerce
            return () if multi else None
        done, result = self._fast(value, multi)
        if done:
            return result
        if self._typer is None:
            from typer._coercion import build_runtime_param
            self._typer = build_runtime_param(param.type_descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)


def install() -> None:
    """Route typer's lazily built coercers of plain parameters through PlainParam (in this
    process only: `kvmrun.cli.main` calls it; typer's CliRunner tests see stock typer)."""
    try:
        from typer.core import _TyperParameter
    except ImportError:
        return
    original = getattr(_TyperParameter, "get_runtime_param", None)
    if original is None or getattr(original, "_kvmrun_plain", False):
        return

    def get_runtime_param(self):
        if getattr(self, "_runtime_param", False) is None:
            descriptor = getattr(self, "type_descriptor", None)
            kind = _kind(getattr(descriptor, "annotation", None))
            if kind is not None and getattr(descriptor, "file_annotation", None) is None:
                self._runtime_param = PlainParam(kind)
        return original(self)

    get_runtime_param._kvmrun_plain = True
    _TyperParameter.get_runtime_param = get_runtime_param
