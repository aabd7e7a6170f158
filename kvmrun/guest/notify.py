"""What the supervisor tells its surroundings: sd_notify(3) datagrams, plain log lines, the
systemd unit it runs in; and a directory watch (dnotify) to sleep on. Standard library
only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET, if systemd gave us one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    import socket               # here: ~3.5 ms on the way to QEMU's spawn, for systemd only
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


def watch_dir(path: Path) -> int | None:
    """Have SIGIO sent to this process whenever a file in the directory `path` is written
    (dnotify: fcntl F_NOTIFY, DN_MODIFY | DN_MULTISHOT; the directory, so a rotated log is
    still watched); the descriptor to keep open, or None where dnotify is unavailable (the
    caller then polls). The caller handles SIGIO first: its default action ends the
    process. The standard library has no inotify, and ctypes for it cost every
    supervisor ~0.5 MiB of private memory."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_NOTIFY, fcntl.DN_MODIFY | fcntl.DN_MULTISHOT)
    except OSError:
        os.close(fd)
        return None
    return fd
