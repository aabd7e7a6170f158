"""A hardened XML reader for libvirt domain definitions, and the bookkeeping of what was read.

Why the standard library's expat and not defusedxml: libvirt writes no DOCTYPE, so the safe
rule is short: any DOCTYPE (and with it every entity declaration, internal or external, the
stuff of "billion laughs" bombs and external-entity reads) is refused before expat expands
anything, and the refusal carries the line it was found on. defusedxml does the same through
the same expat hooks, but its exceptions carry no line, and it would be one more dependency
for five lines of handlers. Files are capped at MAX_BYTES and nesting at MAX_DEPTH.

`parse()` returns a tree of `Node`s. A converter marks what it uses (`node.use()`, every
`node.attr()` it reads); `leftovers()` then lists every element and attribute nobody used,
so nothing in a domain is ever dropped without a line saying so.
"""

from __future__ import annotations

import xml.parsers.expat as expat
from typing import Iterator

from kvmrun.errors import Location, ProfileError
from kvmrun.records import record

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 48
NAMESPACES = {"http://libvirt.org/schemas/domain/qemu/1.0": "qemu"}


class Node:
    """One element: tag (namespaced ones as `prefix:name` or `{uri}name`), attributes,
    direct text, children, its line and its path (`devices/disk[1]/driver`)."""

    __slots__ = ("tag", "attrs", "children", "text", "line", "path", "used", "read")

    def __init__(self, tag: str, attrs: dict[str, str], line: int, path: str):
        self.tag, self.attrs, self.line, self.path = tag, attrs, line, path
        self.children: list[Node] = []
        self.text = ""
        self.used = False
        self.read: set[str] = set()

    def use(self) -> "Node":
        self.used = True
        return self

    def attr(self, name: str, default: str | None = None) -> str | None:
        self.read.add(name)
        return self.attrs.get(name, default)

    def find(self, tag: str) -> "Node | None":
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list["Node"]:
        return [c for c in self.children if c.tag == tag]

    def value(self) -> str:
        """The element's text, stripped; marks it used."""
        self.used = True
        return self.text.strip()

    def __repr__(self) -> str:
        return f"<Node {self.path or self.tag} line {self.line}>"


@record(frozen=True)
class Finding:
    """Something the conversion lost or approximated, with the XML path and line."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_json(self) -> dict:
        return {"path": self.path, "line": self.line, "message": self.message}


class _Refused(Exception):
    pass


def _tag(raw: str) -> str:
    uri, sep, local = raw.rpartition(" ")
    if not sep:
        return raw
    prefix = NAMESPACES.get(uri)
    return f"{prefix}:{local}" if prefix else f"{{{uri}}}{local}"


def _assign_paths(node: Node) -> None:
    """`devices/disk[1]/driver`: an index where a tag repeats among its siblings, and always
    for devices (so `devices/hostdev[0]` reads the same with one hostdev or three)."""
    counts: dict[str, int] = {}
    for child in node.children:
        counts[child.tag] = counts.get(child.tag, 0) + 1
    seen: dict[str, int] = {}
    for child in node.children:
        local = child.tag.rsplit("}", 1)[-1]
        index = seen.get(child.tag, 0)
        seen[child.tag] = index + 1
        step = (f"{local}[{index}]" if counts[child.tag] > 1 or node.tag == "devices"
                else local)
        child.path = f"{node.path}/{step}" if node.path else step
        _assign_paths(child)


def consume(node: Node) -> None:
    """Mark a whole subtree read (it was reported as one loss, or ignored on purpose)."""
    for sub in walk(node):
        sub.used = True
        sub.read.update(sub.attrs)


def parse(raw: bytes, name: str) -> Node:
    """Parse a domain XML document; ProfileError (file and line) for anything wrong."""
    if len(raw) > MAX_BYTES:
        raise ProfileError(Location(name), f"{len(raw)} bytes is too large for a domain "
                                           f"definition (at most {MAX_BYTES})")
    parser = expat.ParserCreate(namespace_separator=" ")
    stack: list[Node] = []
    roots: list[Node] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        tag = _tag(tag)
        attrs = {_tag(k): v for k, v in attrs.items()}
        line = parser.CurrentLineNumber
        if not stack:
            node = Node(tag, attrs, line, "")
            roots.append(node)
        else:
            if len(stack) >= MAX_DEPTH:
                raise _Refused(f"elements nested deeper than {MAX_DEPTH} levels")
            node = Node(tag, attrs, line, "")
            stack[-1].children.append(node)
        stack.append(node)

    def end(_tag_: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack:
            stack[-1].text += data

    def doctype(*_args) -> None:
        raise _Refused("DOCTYPE declarations (and so entities) are refused: libvirt domain "
                       "XML has none, and entities are how XML bombs work")

    def entity(*_args) -> None:
        raise _Refused("entity declarations are refused (XML bombs use them)")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    parser.ExternalEntityRefHandler = lambda *a: 0
    try:
        parser.Parse(raw, True)
    except _Refused as err:
        raise ProfileError(Location(name, line=parser.CurrentLineNumber), str(err)) from None
    except expat.ExpatError as err:
        raise ProfileError(Location(name, line=err.lineno),
                           f"not valid XML: {expat.ErrorString(err.code)} "
                           f"(column {err.offset + 1})") from None
    except (ValueError, TypeError) as err:        # e.g. an unknown declared encoding
        raise ProfileError(Location(name, line=parser.CurrentLineNumber),
                           f"not valid XML: {err}") from None
    root = roots[0]
    _assign_paths(root)
    if root.tag != "domain":
        raise ProfileError(Location(name, line=root.line),
                           f"not a libvirt domain: the root element is <{root.tag}>",
                           hint="`virsh dumpxml NAME > NAME.xml` writes a <domain>")
    return root


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


# elements that only place devices (kvmrun places them itself): a note, never a loss
PLACEMENT = {"address": "device addresses are not kept: kvmrun places devices itself",
             "alias": "device aliases are not kept"}


def leftovers(root: Node) -> tuple[list[Finding], list[Finding]]:
    """(losses, notes) for every element and attribute the converter did not read."""
    losses: list[Finding] = []
    notes: dict[str, Finding] = {}

    def visit(node: Node) -> None:
        local = node.tag.rsplit("}", 1)[-1]
        if not node.used:
            if local in PLACEMENT:
                notes.setdefault(local, Finding("devices/*/" + local, node.line,
                                                PLACEMENT[local]))
            else:
                losses.append(Finding(node.path or "domain", node.line,
                                      f"<{local}> is not supported by kvmrun"))
            return
        for key in node.attrs:
            if key not in node.read and not key.startswith("{"):
                losses.append(Finding(f"{node.path or 'domain'}/@{key}", node.line,
                                      f"{key}={node.attrs[key]!r} is not supported by kvmrun"))
        for child in node.children:
            visit(child)

    visit(root)
    return losses, list(notes.values())
