"""YAML loading that keeps where every value came from.

`load_yaml(path)` returns plain Python data plus a map from key path to (file, line), so a profile
error can name the file, the key path and the line. It rejects what PyYAML would silently accept
or report obscurely: duplicate keys, tabs, non-UTF-8 bytes, empty files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yamlcore import CoreLoader

from kvmrun.errors import Location, ProfileError

KeyPath = tuple[str | int, ...]
Lines = dict[KeyPath, tuple[str, int]]


def load_yaml(path: Path, display: str | None = None) -> tuple[Any, Lines]:
    """Parse one YAML file; raise ProfileError with a location for anything wrong."""
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(Location(name), "file not found") from None
    except IsADirectoryError:
        raise ProfileError(Location(name), "is a directory, not a profile file") from None
    except OSError as err:
        raise ProfileError(Location(name), f"cannot read: {err.strerror}") from err
    return parse_yaml(raw, name)


class _Loader(CoreLoader):
    """yamlcore's YAML 1.2 core schema (by PyYAML's maintainer): `2222:22` stays a string
    (not sexagesimal 133342), only true/false are booleans (`no` is the string 'no'), and
    `010` is ten (YAML 1.1 read it as octal 8)."""


def parse_scalar(text: str) -> Any:
    """A command-line value, read as the profile loader reads a YAML value."""
    return yaml.load(text, Loader=_Loader)


def parse_yaml(raw: bytes, name: str) -> tuple[Any, Lines]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ProfileError(Location(name, line=line),
                           f"not valid UTF-8 (byte 0x{raw[err.start]:02x})",
                           hint="save the file as UTF-8") from None
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as err:           # a control character such as NUL
        line = text[: err.position].count("\n") + 1
        raise ProfileError(Location(name, line=line), "invalid YAML: the character "
                           f"U+{err.character:04X} is not allowed") from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ProfileError(Location(name), "the file is empty",
                               hint="a profile needs at least `name:` and usually `memory:`")
        lines: Lines = {}
        data = _build(loader, node, (), name, lines, set())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = err.problem or str(err)
        if "'\\t'" in problem or "\t" in problem:
            raise ProfileError(Location(name, line=line), "tab character in indentation",
                               hint="YAML indents with spaces only") from None
        raise ProfileError(Location(name, line=line), f"invalid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise ProfileError(Location(name), f"invalid YAML: {err}") from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: _Loader, node: yaml.Node, path: KeyPath, name: str,
           lines: Lines, enclosing: set[int]) -> Any:
    """Plain data from `node`, recording lines; `enclosing` holds the ids of the collections
    being built around it, so an alias to one of them (`a: &x [*x]`) is an error, not an
    endless recursion."""
    lines[path] = (name, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in enclosing:
            raise ProfileError(Location(name, path, node.start_mark.line + 1),
                               "an alias refers to a value that contains it")
        enclosing = enclosing | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise ProfileError(
                    Location(name, path + (key,), key_node.start_mark.line + 1),
                    f"duplicate key (first set on line {lines[path + (key,)][1]})")
            lines[path + (key,)] = (name, key_node.start_mark.line + 1)
            out[key] = _build(loader, value_node, path + (key,), name, lines, enclosing)
            lines[path + (key,)] = (name, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), name, lines, enclosing)
                for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
