"""Interactive serial console: relay a terminal to the guest's console socket.

Ctrl-] detaches (as telnet and virsh console do); the terminal is always restored."""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import tty
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from kvmrun.errors import GuestError

ESCAPE = b"\x1d"         # Ctrl-]


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise GuestError(f"no console socket at {path} (is the guest running with "
                         "serial: log or socket?)") from None
    except (ConnectionRefusedError, socket.timeout):
        sock.close()
        raise GuestError(f"the console {path} does not answer (is another console "
                         "attached?)") from None
    sock.setblocking(False)
    return sock


def relay(path: Path, stdin: int | None = None, stdout: int | None = None) -> str:
    """Relay until Ctrl-] on stdin ('detached'), EOF on stdin ('eof') or the guest side
    closing ('closed')."""
    stdin = sys.stdin.fileno() if stdin is None else stdin
    stdout = sys.stdout.fileno() if stdout is None else stdout
    sock = connect(path)
    try:
        with raw_terminal(stdin):
            while True:
                readable, _, _ = select.select([stdin, sock], [], [])
                if sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return "closed"
                    os.write(stdout, data)
                if stdin in readable:
                    data = os.read(stdin, 1024)
                    if not data:
                        return "eof"
                    if ESCAPE in data:
                        before = data.split(ESCAPE, 1)[0]
                        if before:
                            sock.sendall(before)
                        return "detached"
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
    finally:
        sock.close()
