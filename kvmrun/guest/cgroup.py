"""A guest's resource limits (`limits:` in a profile) through a cgroup v2 leaf of its own.

Where systemd runs (PID 1, /run/systemd/system), QEMU starts in a transient scope
(`systemd-run --scope`, which execs QEMU in place: the same PID, limits as unit properties,
the scope collected when QEMU ends). Elsewhere kvmrun makes a cgroup directory
`<cgroup2 mount>/kvmrun/<name>` (KVMRUN_CGROUP_ROOT names another parent), enables the
controllers the limits need on the way down, writes the limits, and the supervisor moves
QEMU into it between fork and exec (so every page QEMU touches is charged there); the
supervisor removes the directory when QEMU has ended.

A host without a usable cgroup v2 (none mounted, or the controllers still bound to cgroup
v1, as on a hybrid host) refuses a profile that asks for limits: limits silently not applied
would be worse than none asked.

Standard library only: the supervisor imports it.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from kvmrun.errors import HostError

CONTROLLER = {"cpu_weight": "cpu", "cpu_max": "cpu", "memory_max": "memory",
              "io_weight": "io"}
PERIOD = 100_000                       # cpu.max period, µs (the kernel's default)
PROPERTY = {"cpu_weight": "CPUWeight", "cpu_max": "CPUQuota", "memory_max": "MemoryMax",
            "io_weight": "IOWeight"}


def limit_files(limits: dict) -> dict[str, str]:
    """{'cpu_weight': 50, 'cpu_max': 150, 'memory_max': 2048, 'io_weight': 10} ->
    {'cpu.weight': '50', 'cpu.max': '150000 100000', 'memory.max': '2147483648',
    'io.weight': 'default 10'}."""
    out = {}
    if "cpu_weight" in limits:
        out["cpu.weight"] = str(limits["cpu_weight"])
    if "cpu_max" in limits:
        out["cpu.max"] = f"{limits['cpu_max'] * PERIOD // 100} {PERIOD}"
    if "memory_max" in limits:
        out["memory.max"] = str(limits["memory_max"] << 20)
    if "io_weight" in limits:
        out["io.weight"] = f"default {limits['io_weight']}"
    return out


def scope_properties(limits: dict) -> list[str]:
    """The same limits as systemd unit properties (-p KEY=VALUE)."""
    values = {"cpu_weight": str, "cpu_max": lambda v: f"{v}%",
              "memory_max": lambda v: f"{v}M", "io_weight": str}
    return [f"{PROPERTY[k]}={values[k](v)}" for k, v in limits.items()]


def systemd_runs() -> bool:
    return os.path.isdir("/run/systemd/system")


def mount_point() -> Path | None:
    """Where a cgroup2 hierarchy is mounted (/sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            found.append(Path(left.split()[4].replace("\\040", " ")))
    found.sort(key=lambda p: (p != Path("/sys/fs/cgroup"), len(str(p))))
    return found[0] if found else None


def parent_dir() -> Path | None:
    """The directory guests' leaves go in: KVMRUN_CGROUP_ROOT, else <mount>/kvmrun."""
    named = os.environ.get("KVMRUN_CGROUP_ROOT")
    if named:
        return Path(named)
    mount = mount_point()
    return mount / "kvmrun" if mount else None


def _available(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _nearest(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check(limits: dict) -> str:
    """How limits would be applied here ('scope' or 'directory'); a HostError with a hint
    when they cannot be."""
    if not limits:
        return "none"
    if systemd_runs():
        return "scope"
    parent = parent_dir()
    if parent is None:
        raise HostError("limits: asked for, but this host has no cgroup v2 hierarchy mounted",
                        hint="mount one (mount -t cgroup2 none /sys/fs/cgroup on a unified "
                             "host), or remove limits: from the profile")
    needed = sorted({CONTROLLER[k] for k in limits})
    have = _available(_nearest(parent))
    missing = [c for c in needed if c not in have]
    if missing:
        has = ", ".join(sorted(have)) or "none"
        raise HostError(
            f"limits: asked for, but the cgroup v2 hierarchy at {_nearest(parent)} has no "
            f"{' or '.join(missing)} controller (it has: {has})",
            hint="a controller still bound to a cgroup v1 hierarchy is not available in v2: "
                 "boot with systemd.unified_cgroup_hierarchy=1 (or unmount the v1 "
                 "hierarchies), or remove limits: from the profile")
    return "directory"


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as err:
        raise HostError(f"cannot write {value!r} to {path}: {err.strerror}",
                        hint="the cgroup hierarchy refused it; see the kernel's "
                             "cgroup-v2 documentation for that file") from None


def _enable(directory: Path, controllers: list[str]) -> None:
    if not controllers:
        return
    enabled = set((directory / "cgroup.subtree_control").read_text().split())
    todo = [c for c in controllers if c not in enabled]
    if todo:
        _write(directory / "cgroup.subtree_control", " ".join("+" + c for c in todo))


def make_leaf(name: str, limits: dict) -> Path:
    """The guest's cgroup directory, made with its limits written (the controllers they
    need enabled on the way down from the nearest existing ancestor)."""
    parent = parent_dir()
    assert parent is not None, "check() first"
    controllers = sorted({CONTROLLER[k] for k in limits})
    top = _nearest(parent)
    try:
        _enable(top, controllers)
        for step in reversed([parent, *parent.parents][:len(parent.parts)
                                                       - len(top.parts)]):
            step.mkdir(mode=0o755, exist_ok=True)
            _enable(step, controllers)
        leaf = parent / name
        if leaf.exists():
            remove(leaf, wait=0)                 # an empty leftover of a crashed start
        leaf.mkdir(mode=0o755)
    except FileExistsError:
        raise HostError(f"the cgroup {parent / name} exists already (a guest of that name "
                        f"runs there, or a leftover)", hint=f"rmdir {parent / name} "
                        "once no process is in it") from None
    except OSError as err:
        raise HostError(f"cannot make the guest's cgroup under {parent}: {err.strerror}",
                        hint="the parent may hold processes of its own (cgroup v2 puts "
                             "processes only in leaves); name another with "
                             "KVMRUN_CGROUP_ROOT") from None
    try:
        for file, value in limit_files(limits).items():
            _write(leaf / file, value)
    except HostError:
        remove(leaf)
        raise
    return leaf


def enter(leaf: str) -> None:
    """Move the calling process into `leaf` (the supervisor's child, before it execs QEMU)."""
    fd = os.open(os.path.join(leaf, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def remove(leaf: str | Path, wait: float = 5.0) -> bool:
    """Remove an (emptied) leaf; a process that just ended may keep it busy a moment."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(leaf)
            return True
        except FileNotFoundError:
            return True
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def of_pid(pid: int) -> str | None:
    """The cgroup v2 path of a process (its `0::` line), or None."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def scope_argv(name: str, run_id: str, limits: dict) -> list[str]:
    """The prefix that starts QEMU in a transient systemd scope with the limits."""
    argv = ["systemd-run", "--scope", "--quiet", "--collect",
            f"--unit=kvmrun-{name}-{run_id[:8]}"]
    for prop in scope_properties(limits):
        argv += ["-p", prop]
    return argv + ["--"]
