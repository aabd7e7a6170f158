"""libvirt-guests' job for kvmrun (kvmrun-guests.service): mark defined VMs to start at
boot (`kvmrun autostart NAME`), start the marked ones, and stop, gracefully and all at
once, the guests that run outside their own kvmrun@NAME unit.

The mark is a link <config dir>/autostart/NAME.yaml -> ../vms/NAME.yaml, kept out of the
profile as libvirt keeps its autostart/ links out of the domain XML: whether a VM starts with
this host is the host's choice, and an exported or migrated profile does not carry it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from kvmrun.errors import KvmrunError
from kvmrun.guest.rundir import Guest, guest_names
from kvmrun.ops import defined, launch, power, systemd
from kvmrun.paths import autostart_path, defined_path, valid_name

Note = Callable[[str], None]


# ---------------------------------------------------------------- the mark

def set_autostart(name: str, on: bool = True) -> bool:
    """Mark (or unmark) a defined VM; returns whether the mark changed."""
    defined.require_defined(name)
    mark = autostart_path(name)
    present = mark.is_symlink() or mark.exists()
    if on == present:
        return False
    if on:
        mark.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        mark.symlink_to(f"../vms/{defined_path(name).name}")
    else:
        mark.unlink()
    return True


def autostart_names() -> list[str]:
    """The marked VMs that are still defined (a dangling mark is skipped)."""
    folder = autostart_path("x").parent
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p.stem for p in entries if p.suffix == ".yaml" and valid_name(p.stem)
            and defined_path(p.stem).is_file()]


def is_marked(name: str) -> bool:
    return name in autostart_names()


# ---------------------------------------------------------------- at boot

def start_marked(note: Note = lambda m: None) -> list[dict]:
    """Start every marked VM that is not running and not enabled as its own unit (systemd
    starts those itself), one after another, each returning once QMP answers. One row
    per VM: {"name", "result": started|running|unit|failed, ...}."""
    rows = []
    for name in autostart_names():
        unit = systemd.instance(name)
        if defined.is_running(name):
            rows.append({"name": name, "result": "running"})
        elif systemd.systemd_running() and systemd.is_enabled(unit, systemd.user_units()):
            rows.append({"name": name, "result": "unit", "unit": unit})
        else:
            try:
                started = launch.start(defined.load(defined_path(name)), wait_ready=False,
                                       note=note)
                rows.append({"name": name, "result": "started", "pid": started.get("pid")})
            except KvmrunError as err:
                rows.append({"name": name, "result": "failed", "error": str(err),
                             "exit_code": err.exit_code})
    return rows


# ---------------------------------------------------------------- at shutdown

def outside_units() -> list[str]:
    """The running guests whose supervisor is not in their own kvmrun@NAME unit."""
    names = []
    for name in guest_names():
        guest = Guest(name)
        state = guest.read_state()
        if not isinstance(state, dict) or guest.qemu_pid(state) is None:
            continue
        if state.get("unit") != systemd.instance(name):
            names.append(name)
    return names


def _stop_one(name: str, note: Note) -> dict:
    def progress(stage: str, message: str) -> None:
        note(f"{name}: {message}")
    try:
        result = power.stop(Guest(name), None, True, progress=progress)
    except KvmrunError as err:
        return {"name": name, "result": "failed", "error": str(err),
                "exit_code": err.exit_code}
    return {"name": name, "result": "stopped", "stage": result["stage"],
            "method": result["method"]}


def stop_all(note: Note = lambda m: None) -> list[dict]:
    """Stop the guests outside units all at once, each as `kvmrun stop --force` does: its
    profile's shutdown method and timeout, then QMP quit, SIGTERM, SIGKILL."""
    names = outside_units()
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(lambda n: _stop_one(n, note), names))
