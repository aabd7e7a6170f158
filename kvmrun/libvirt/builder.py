"""The state of one conversion while the domain's tree is read: the profile mapping, its
line map, and the findings (losses, notes, paths missing on this host)."""

from __future__ import annotations

from typing import Any, Callable

from kvmrun.errors import Location, ProfileError
from kvmrun.libvirt import _xml
from kvmrun.libvirt._xml import Finding, Node


class Builder:
    """Collects the profile mapping, its line map and the findings while the tree is read."""

    def __init__(self, source: str, path_exists: Callable[[str], bool],
                 pool_exists: Callable[[str], bool]):
        self.source = source
        self.data: dict[str, Any] = {}
        self.lines: dict[tuple, tuple[str, int]] = {}
        self.losses: list[Finding] = []
        self.notes: list[Finding] = []
        self.missing: list[Finding] = []
        self.path_exists = path_exists
        self.pool_exists = pool_exists
        self.nvram: str | None = None
        self.arch: str | None = None

    def set(self, key: tuple, value: Any, node: Node | None) -> None:
        target = self.data
        for part in key[:-1]:
            target = target.setdefault(part, {})
        target[key[-1]] = value
        if node is not None:
            self.lines[key] = (self.source, node.line)

    def loss(self, node: Node, message: str, attr: str | None = None) -> None:
        path = (node.path or "domain") + (f"/@{attr}" if attr else "")
        self.losses.append(Finding(path, node.line, message))

    def drop(self, node: Node, message: str) -> None:
        """A loss of the whole element: nothing under it is reported again."""
        _xml.consume(node)
        self.loss(node, message)

    def check_path(self, node: Node, path: str, what: str) -> None:
        if not self.path_exists(path):
            self.missing.append(Finding(node.path, node.line, f"{what} {path} not found on "
                                                               "this host"))

    def note(self, node: Node, message: str) -> None:
        self.notes.append(Finding(node.path or "domain", node.line, message))

    def refuse(self, node: Node, message: str, hint: str | None = None) -> None:
        raise ProfileError(Location(self.source, line=node.line), message, hint)
