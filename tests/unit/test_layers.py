"""The house rule, checked on the code itself: layers import only downwards, the light guest
wing (and the ground floor) imports nothing beyond the standard library, and there is no
import cycle — between modules or between subpackages, function-local imports and
`lazy("…")` imports included (kvmrun.cli.app.lazy).

    face        kvmrun.cli, kvmrun.ui
    operations  kvmrun.ops
    backends    kvmrun.qemu, kvmrun.storage, kvmrun.net, kvmrun.libvirt
    guest wing  kvmrun.guest
    front end   kvmrun.profile
    ground      kvmrun.errors, paths, arch, files, proc, records
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kvmrun"
LAYERS = {"ground": 0, "profile": 1, "guest": 2, "backends": 3, "ops": 4, "face": 5}
ROOMS = {"profile": "profile", "guest": "guest", "qemu": "backends", "storage": "backends",
         "net": "backends", "libvirt": "backends", "ops": "ops", "cli": "face", "ui": "face"}
GROUND = {"kvmrun", "kvmrun.errors", "kvmrun.paths", "kvmrun.arch", "kvmrun.files",
          "kvmrun.proc", "kvmrun.records"}
ENTRY = "kvmrun.__main__"          # `python -m kvmrun`: the face


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> set[str]:
    """Every kvmrun or third-party module `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            known = modules()
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found.update(subs)
            if len(subs) < len(node.names):       # names from the module itself
                found.add(base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "lazy" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return {m for m in found if m and m != "__future__"}


def layer(name: str) -> str:
    if name in GROUND:
        return "ground"
    if name == ENTRY:
        return "face"
    return ROOMS[name.split(".")[1]]


def kvmrun_imports(name: str, path: Path) -> set[str]:
    known = modules()
    return {m for m in imports(path, name) if m in known and m != name}


def test_every_module_has_a_room():
    for name in modules():
        assert layer(name) in LAYERS, name


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_go_only_downwards(name):
    path = modules()[name]
    mine = LAYERS[layer(name)]
    upward = {m for m in kvmrun_imports(name, path) if LAYERS[layer(m)] > mine}
    assert not upward, f"{name} ({layer(name)}) imports upwards: {sorted(upward)}"


@pytest.mark.parametrize("name", sorted(n for n in modules()
                                        if layer(n) in ("ground", "guest")))
def test_ground_and_guest_wing_use_the_standard_library_only(name):
    third_party = {m for m in imports(modules()[name], name)
                   if m.split(".")[0] not in sys.stdlib_module_names
                   and m.split(".")[0] != "kvmrun"}
    assert not third_party, f"{name} imports {sorted(third_party)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_import_cycle():
    graph = {name: kvmrun_imports(name, path) for name, path in modules().items()}
    # a package's __init__ that only documents is no edge; one that re-exports is
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_cycle_between_subpackages():
    def room(name: str) -> str:
        return "ground" if name in GROUND else "kvmrun.cli" if name == ENTRY else \
            ".".join(name.split(".")[:2])
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        for target in kvmrun_imports(name, path):
            if room(target) != room(name):
                graph.setdefault(room(name), set()).add(room(target))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_checks_can_fail():
    """The cycle finder finds a cycle, and the layer of a cli module is above ops."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert LAYERS[layer("kvmrun.cli.app")] > LAYERS[layer("kvmrun.ops.launch")]
