"""The network record of a guest (`network.json`): the NICs as status shows them, and what
network setup made for them (taps, hub port links, datagram sockets), so the end of a guest
can take those away again without the rest of kvmrun.net. Standard library only: the
supervisor calls `teardown` when its guest ends (kvmrun.net.nics writes the record).
"""

from __future__ import annotations

import os

from kvmrun import files
from kvmrun.paths import RunPaths

MADE = ("taps", "ports", "sockets")


def read(paths: RunPaths) -> dict:
    record = files.read_json(paths.network, {})
    return record if isinstance(record, dict) else {}


def write(paths: RunPaths, record: dict) -> None:
    files.write_json(paths.network, record, durable=False)     # void after a reboot


def undo(record: dict) -> None:
    """Remove what a record says was made. Never raises."""
    import subprocess            # only for taps (not at the top: the quick start loads this)
    for tap in record.get("taps", []):
        if os.path.exists(f"/sys/class/net/{tap}"):
            try:
                subprocess.run(["ip", "link", "del", tap], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
    for path in record.get("ports", []) + record.get("sockets", []):
        try:
            os.unlink(path)
        except OSError:
            pass


def teardown(paths: RunPaths) -> None:
    """Remove what setup made for this guest (taps, hub ports); keep the NIC list for
    status. Safe to call twice; never raises."""
    record = read(paths)
    if not any(record.get(k) for k in MADE):
        return
    undo(record)
    try:
        write(paths, {"nics": record.get("nics", [])})
    except OSError:
        pass
