"""The hub of an isolated network: a tiny learning Ethernet switch between unix sockets.

Each guest NIC on isolated network NAME is a QEMU `-netdev dgram` bound to a unix datagram
socket in the guest's run directory and sending to <run dir>/.net/NAME/hub.sock. The hub
forwards each frame to the port that owns the destination MAC, or floods it to every other
port. Ports are the symlinks in <run dir>/.net/NAME/ports/ (made by kvmrun.net.isolated,
removed at teardown by kvmrun.guest.netrecord); frames from anything else are dropped. No IP, no host interface, no
root: guests on the network reach each other and nothing else.

The hub exits after IDLE seconds without ports. Standard library only.

    python -m kvmrun.net.hub <run dir>/.net/NAME
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
import time
from pathlib import Path

from kvmrun import files, proc

IDLE = float(os.environ.get("KVMRUN_HUB_IDLE") or 30.0)   # seconds without ports, then exit
START_GRACE = float(os.environ.get("KVMRUN_PORT_GRACE") or 60.0)  # a new port's QEMU starts
REFRESH = 1.0            # seconds between re-reads of the ports directory
MAC_AGE = 300.0          # seconds a learnt MAC stays


def collect_stale(ports_dir: Path) -> list[str]:
    """Remove the port links whose guest's QEMU is gone (a guest that crashed with its
    supervisor, so nobody tore its port down): a port is live while a QEMU holds the
    pidfile lock in the run directory the port's socket lives in, or while it is younger
    than START_GRACE (its QEMU is still starting). Returns the names removed."""
    removed = []
    try:
        links = list(ports_dir.iterdir())
    except FileNotFoundError:
        return removed
    for link in links:
        try:
            target = Path(os.readlink(link))
            age = time.time() - link.lstat().st_ctime
        except OSError:
            continue
        if age < START_GRACE or _qemu_alive(target.parent / "qemu.pid"):
            continue
        try:
            link.unlink()
            removed.append(link.name)
        except OSError:
            pass
    return removed


def _qemu_alive(pidfile: Path) -> bool:
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return files.write_locked(fd)
    finally:
        os.close(fd)


class Hub:
    def __init__(self, directory: Path):
        self.dir = directory
        self.ports_dir = directory / "ports"
        self.ports: set[str] = set()          # socket paths of attached NICs
        self.macs: dict[bytes, tuple[str, float]] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.path = directory / "hub.sock"
        self.refreshed = 0.0
        self.collected = 0.0
        self.empty_since = time.monotonic()

    def bind(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        files.write_json(self.dir / "hub.json",
                         {"pid": os.getpid(), "starttime": proc.starttime(os.getpid())})

    def refresh(self) -> None:
        if time.monotonic() - self.collected > START_GRACE / 4:
            collect_stale(self.ports_dir)
            self.collected = time.monotonic()
        ports = set()
        try:
            for link in self.ports_dir.iterdir():
                try:
                    ports.add(os.readlink(link))
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        self.ports = ports
        self.macs = {m: v for m, v in self.macs.items() if v[0] in ports}
        self.refreshed = time.monotonic()
        if ports:
            self.empty_since = self.refreshed

    def send(self, frame: bytes, port: str) -> None:
        try:
            self.sock.sendto(frame, port)
        except OSError as err:
            if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return                       # that guest's QEMU is gone or not bound yet
            if err.errno in (errno.EAGAIN, errno.ENOBUFS):
                return                       # a full receiver drops, as a switch would
            raise

    def forward(self, frame: bytes, sender: str) -> None:
        if sender not in self.ports:
            self.refresh()
            if sender not in self.ports:
                return                       # not a member: dropped
        if len(frame) < 14:
            return
        now = time.monotonic()
        dst, src = frame[0:6], frame[6:12]
        if not src[0] & 1:
            self.macs[src] = (sender, now)
        known = self.macs.get(dst)
        if not dst[0] & 1 and known and now - known[1] < MAC_AGE:
            if known[0] != sender:
                self.send(frame, known[0])
            return
        for port in self.ports:
            if port != sender:
                self.send(frame, port)

    def idle_exit(self) -> bool:
        """Exit (under the network's lock, so no guest is attaching) when no ports are left."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            self.refresh()
            if self.ports:
                return False
            for leaf in ("hub.sock", "hub.json"):
                try:
                    (self.dir / leaf).unlink()
                except FileNotFoundError:
                    pass
            return True
        finally:
            os.close(fd)

    def run(self) -> int:
        self.bind()
        self.refresh()
        while True:
            readable, _, _ = select.select([self.sock], [], [], REFRESH)
            if readable:
                for _ in range(256):         # drain a burst before looking around again
                    try:
                        frame, sender = self.sock.recvfrom(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    self.forward(frame, sender)
            now = time.monotonic()
            if now - self.refreshed >= REFRESH:
                self.refresh()
                if not self.ports and now - self.empty_since > IDLE and self.idle_exit():
                    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m kvmrun.net.hub <run dir>/.net/NAME\n")
        return 2
    return Hub(Path(args[0])).run()


if __name__ == "__main__":
    sys.exit(main())
