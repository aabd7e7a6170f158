"""YAML loading that keeps where every value came from.

`load_yaml(path)` returns plain Python data plus a map from key path to (file, line), so a profile
error can name the file, the key path and the line. It rejects what PyYAML would silently accept
or report obscurely: duplicate keys, tabs, non-UTF-8 bytes, empty files. Hostile input is
bounded before it costs anything: a file over MAX_BYTES is refused unread, nesting deeper
than MAX_DEPTH stops the composer (no RecursionError), aliases may expand to at most
MAX_VALUES values (no billion laughs), and a value its tag cannot build (`!!int abc`, a
4,300-digit number) is a located error, never a crash.
"""

from __future__ import annotations

import re
from pathlib import Path
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way
if TYPE_CHECKING:
    from typing import Any

import yaml
from yamlcore import CoreLoader

from kvmrun.errors import Location, ProfileError

KeyPath = tuple[str | int, ...]
Lines = dict[KeyPath, tuple[str, int]]

PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
MAX_BYTES = 64 * 1024        # a profile is a few KiB; a bigger file is refused unread
MAX_DEPTH = 64               # nested mappings and lists (a real profile nests 3 deep)
MAX_VALUES = 5_000           # values after alias expansion (billion laughs)
_FLOW = re.compile(r"[\[\]{}\n]|'[^'\n]*'|\"(?:[^\"\\\\\n]|\\\\.)*\"|#[^\n]*")


def load_yaml(path: Path, display: str | None = None) -> tuple[Any, Lines]:
    """Parse one YAML file; raise ProfileError with a location for anything wrong."""
    name = display or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(Location(name), "file not found") from None
    except IsADirectoryError:
        raise ProfileError(Location(name), "is a directory, not a profile file") from None
    except OSError as err:
        raise ProfileError(Location(name), f"cannot read: {err.strerror}") from err
    return parse_yaml(raw, name)


def _too_big(name: str) -> ProfileError:
    return ProfileError(Location(name), f"is larger than {MAX_BYTES // 1024} KiB; "
                        "a profile is a few KiB", hint="is this the right file?")


class _Loader(CoreLoader):
    """yamlcore's YAML 1.2 core schema (by PyYAML's maintainer): `2222:22` stays a string
    (not sexagesimal 133342), only true/false are booleans (`no` is the string 'no'), and
    `010` is ten (YAML 1.1 read it as octal 8). The composer stops at MAX_DEPTH."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_VALUES:
                mark = self.peek_event().start_mark
                raise ProfileError(Location(self.name, line=mark.line + 1),
                                   f"more than {MAX_VALUES} values; a profile has a few dozen")
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ProfileError(Location(self.name, line=mark.line + 1),
                                   f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_scalar(text: str, where: str = "command line") -> Any:
    """A command-line value, read as the profile loader reads a YAML value, within the
    same bounds (size, depth, aliases, tags). Raises yaml.YAMLError for text that is not
    YAML (the caller then takes it as a string) and ProfileError for text that breaks a
    bound or a tag."""
    if len(text) > MAX_BYTES:
        raise _too_big(where)
    _flow_depth(text, where)
    loader = _Loader(text)
    loader.name = where
    try:
        node = loader.get_single_node()
        return None if node is None else _build(loader, node, (), where, {}, set(),
                                                [MAX_VALUES])
    except RecursionError:
        raise ProfileError(Location(where), "nested too deeply") from None
    finally:
        loader.dispose()


def _flow_depth(text: str, name: str) -> None:
    """Refuse flow nesting over MAX_DEPTH before the scanner sees it (PyYAML's scanner
    spends ~0.4 s on a line of brackets before the composer could stop it)."""
    depth, line = 0, 1
    for m in _FLOW.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
        elif tok in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ProfileError(Location(name, line=line),
                                   f"nested more than {MAX_DEPTH} levels deep")
        elif tok in "]}":
            depth = max(0, depth - 1)


def parse_yaml(raw: bytes, name: str) -> tuple[Any, Lines]:
    if len(raw) > MAX_BYTES:
        raise _too_big(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ProfileError(Location(name, line=line),
                           f"not valid UTF-8 (byte 0x{raw[err.start]:02x})",
                           hint="save the file as UTF-8") from None
    _flow_depth(text, name)
    try:
        loader = _Loader(text)
        loader.name = name
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
        data = _build(loader, node, (), name, lines, set(), [MAX_VALUES])
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
    except RecursionError:           # a last guard: MAX_DEPTH stops real nesting first
        raise ProfileError(Location(name), "nested too deeply") from None
    finally:
        loader.dispose()
    return data, lines


def _build(loader: _Loader, node: yaml.Node, path: KeyPath, name: str,
           lines: Lines, enclosing: set[int], budget: list[int]) -> Any:
    """Plain data from `node`, recording lines; `enclosing` holds the ids of the collections
    being built around it, so an alias to one of them (`a: &x [*x]`) is an error, not an
    endless recursion; `budget` counts down the values still allowed (aliases expand)."""
    lines[path] = (name, node.start_mark.line + 1)
    budget[0] -= 1
    if budget[0] < 0:
        raise ProfileError(Location(name, path, node.start_mark.line + 1),
                           f"expands to more than {MAX_VALUES} values (aliases repeat "
                           "values; a profile has a few dozen)")
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if node.tag not in PLAIN_TAGS:        # a tag would be dropped silently: refuse it
            raise ProfileError(Location(name, path, node.start_mark.line + 1),
                               f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')!r} "
                               "is not supported here")
        if id(node) in enclosing:
            raise ProfileError(Location(name, path, node.start_mark.line + 1),
                               "an alias refers to a value that contains it")
        enclosing = enclosing | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(loader, key_node, path, name)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise ProfileError(
                    Location(name, path + (key,), key_node.start_mark.line + 1),
                    f"duplicate key (first set on line {lines[path + (key,)][1]})")
            lines[path + (key,)] = (name, key_node.start_mark.line + 1)
            out[key] = _build(loader, value_node, path + (key,), name, lines, enclosing,
                              budget)
            lines[path + (key,)] = (name, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), name, lines, enclosing, budget)
                for i, item in enumerate(node.value)]
    return _scalar(loader, node, path, name)


def _scalar(loader: _Loader, node: yaml.Node, path: KeyPath, name: str) -> Any:
    """A key or scalar as its tag builds it; a value the tag cannot build is located."""
    if not isinstance(node, yaml.ScalarNode):
        raise ProfileError(Location(name, path, node.start_mark.line + 1),
                           "a key must be a plain value, not a mapping or list")
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, OverflowError, TypeError, KeyError, IndexError) as err:
        tag = node.tag.rsplit(":", 1)[-1]
        value = node.value if len(node.value) <= 40 else node.value[:40] + "…"
        reason = "too many digits" if "digits" in str(err) else f"not a valid {tag}"
        raise ProfileError(Location(name, path, node.start_mark.line + 1),
                           f"{value!r}: {reason}") from None
