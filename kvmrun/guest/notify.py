"""What the supervisor tells its surroundings: sd_notify(3) datagrams, plain log lines, the
systemd unit it runs in; and an inotify watch to sleep on. Standard library only."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

IN_MODIFY = 0x00000002


def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET, if systemd gave us one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError:
        pass


def log(message: str) -> None:
    """One plain line per event on stderr (journal-friendly)."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except OSError:
        pass            # a full disk under supervisor.log must not end the supervisor


def current_unit() -> str | None:
    """The systemd unit this process runs in, from its cgroup (e.g. kvmrun@web1.service)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


def watch_file(path: Path) -> int | None:
    """An inotify fd that becomes readable when `path` is written (or None where inotify
    is unavailable: the caller then polls). ctypes, since the stdlib has no inotify."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            os.close(fd)
            return None
        return fd
    except (OSError, AttributeError):
        return None
