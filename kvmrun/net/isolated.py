"""Isolated networks: guests only, no root. Each NIC is a unix datagram socket wired to the
network's hub (kvmrun.net.hub, one process per network, started on first use, gone when
idle); a NIC's membership is a symlink in <run dir>/.net/NAME/ports/."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvmrun import files, proc
from kvmrun.errors import GuestError, HostError, NetworkError
from kvmrun.net.hub import collect_stale
from kvmrun.net.names import net_dir, port_socket
from kvmrun.paths import RunPaths

def read_record(path: Path) -> dict:
    found = files.read_json(path, {})
    return found if isinstance(found, dict) else {}


@contextmanager
def locked(directory: Path, timeout: float = 30.0) -> Iterator[None]:
    try:
        with files.flocked(directory / "lock", timeout):
            yield
    except TimeoutError:
        raise NetworkError(f"cannot lock {directory}: another kvmrun command holds it") \
            from None


def alive(record: dict, marker: str) -> int | None:
    """The recorded pid if it is still that process and `marker` is one of its arguments."""
    pid = record.get("pid")
    return pid if proc.identified(pid, record.get("starttime"), marker) else None


def attach_port(paths: RunPaths, name: str, guest: str, index: int) -> Path:
    directory = net_dir(name, paths.dir.parent)
    with locked(directory):
        ensure_hub(directory)
        ports = directory / "ports"
        ports.mkdir(exist_ok=True, mode=0o700)
        link = ports / f"{guest}.{index}"
        try:
            link.unlink()
        except FileNotFoundError:
            pass
        sock = port_socket(paths, index)
        try:
            sock.unlink()
        except FileNotFoundError:
            pass
        os.symlink(sock, link)
    return link


def hub_pid(directory: Path) -> int | None:
    return alive(read_record(directory / "hub.json"), str(directory))


def ensure_hub(directory: Path) -> None:
    """Start the network's hub unless it runs (called under the network's lock)."""
    if hub_pid(directory) is not None and (directory / "hub.sock").exists():
        return
    log = open(directory / "hub.log", "ab")
    try:
        child = subprocess.Popen([sys.executable, "-m", "kvmrun.net.hub", str(directory)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise HostError(f"the hub of network {directory.name!r} exited ({child.returncode})",
                            hint=f"see {directory / 'hub.log'}")
        if (directory / "hub.sock").exists() and hub_pid(directory) == child.pid:
            return
        time.sleep(0.02)
    raise HostError(f"the hub of network {directory.name!r} did not start")


def members(name: str, base: Path | None = None) -> list[str]:
    """GUEST.INDEX of the NICs attached to a named network (ports of guests that are
    gone are collected first)."""
    collect_stale(net_dir(name, base) / "ports")
    try:
        return sorted(p.name for p in (net_dir(name, base) / "ports").iterdir())
    except FileNotFoundError:
        return []


def hub_stop(name: str, force: bool = False) -> None:
    """Stop the hub of isolated network `name` (it also goes by itself when idle)."""
    directory = net_dir(name)
    with locked(directory):
        attached = members(name)
        if attached and not force:
            raise GuestError(f"network {name!r} is in use by {len(attached)} guest NIC(s) "
                             f"({', '.join(attached)})",
                             hint="stop those guests first, or --force")
        pid = hub_pid(directory)
        if pid is not None:
            proc.terminate(pid)
        for leaf in ("hub.sock", "hub.json"):
            try:
                (directory / leaf).unlink()
            except FileNotFoundError:
                pass
