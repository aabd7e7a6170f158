"""The shutdown ladder, shared by `kvmrun stop` and the supervisor (SIGTERM, systemd stop).

    graceful: acpi (system_powerdown, re-sent every RESEND s) | agent | console | none
    then, only when forced: QMP quit -> SIGTERM -> SIGKILL, each with a short grace period

Waiting never polls with sleeps: it blocks on a pidfd, which becomes readable the moment
QEMU exits. Signals go through the pidfd too, so they can only reach the process that was
identified when the pidfd was opened.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable  # not typing: ~1 MiB in every supervisor

from kvmrun.errors import GuestError, GuestTimeout
from kvmrun.proc import wait_pidfd

RESEND = 5.0            # seconds between ACPI requests (guests miss them while booting)
GRACE = 5.0             # seconds each hard stage gets before the next
HARD_STAGES = ("quit", "sigterm", "sigkill")


def type_on_console(console_sock: str, command: str, settle: float = 5.0) -> None:
    """Type a command line on the serial console (shutdown.method: console).

    QEMU moves bytes from the socket to the guest's UART only as fast as the UART takes
    them (a PL011 holds 16), and drops what it has not read yet when the client hangs up.
    So the line is sent, our side half-closed, and the socket kept open until QEMU has
    read it all and closes its end at our EOF (at most `settle` seconds)."""
    import socket                   # here: the start path imports this module (~3 ms)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(console_sock)
        sock.sendall(b"\r\n" + command.encode() + b"\r\n")
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if not sock.recv(4096):
                    break
            except OSError:             # timeout or reset: nothing more to wait for
                break


def agent_shutdown(qga_sock: str) -> None:
    """Ask the QEMU guest agent to power off (its reply never comes: the guest goes down)."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(qga_sock)
        sock.sendall(b'{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}\n')


class Ladder:
    """One run of the ladder against one identified QEMU.

    `qmp(command)` sends a QMP command on whatever connection the caller owns (errors are
    ignored: a dying QEMU may close it). `progress(stage, message)` reports each step."""

    def __init__(self, pidfd: int, qmp: Callable[[str], None], *, method: str = "acpi",
                 console_sock: str = "", qga_sock: str = "", command: str = "poweroff",
                 progress: Callable[[str, str], None] = lambda stage, msg: None):
        self.pidfd = pidfd
        self.qmp = qmp
        self.method = method
        self.console_sock = console_sock
        self.qga_sock = qga_sock
        self.command = command
        self.progress = progress

    def _ask(self) -> None:
        try:
            if self.method == "acpi":
                self.qmp("system_powerdown")
            elif self.method == "agent":
                agent_shutdown(self.qga_sock)
            elif self.method == "console":
                type_on_console(self.console_sock, self.command)
        except (OSError, GuestError) as err:
            self.progress(self.method, f"request failed ({err}); will retry")

    def graceful(self, timeout: float) -> bool:
        """Ask the guest to power off and wait; True if QEMU exited within `timeout`."""
        if self.method == "none":
            return False
        deadline = time.monotonic() + timeout
        self.progress(self.method, f"asking the guest to power off ({self.method})")
        while True:
            self._ask()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if wait_pidfd(self.pidfd, min(RESEND, left)):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.progress(self.method, f"waiting for the guest to power off "
                                       f"({left:.0f}s left); asking again")

    def hard(self) -> str:
        """QMP quit, then SIGTERM, then SIGKILL; returns the stage that ended QEMU."""
        for stage in HARD_STAGES:
            self.progress(stage, {"quit": "sending QMP quit", "sigterm": "sending SIGTERM",
                                  "sigkill": "sending SIGKILL"}[stage])
            try:
                if stage == "quit":
                    self.qmp("quit")
                else:
                    signal.pidfd_send_signal(
                        self.pidfd, signal.SIGTERM if stage == "sigterm" else signal.SIGKILL)
            except (OSError, GuestError):
                pass
            if wait_pidfd(self.pidfd, GRACE if stage != "sigkill" else 30):
                return stage
        raise GuestError("QEMU survived SIGKILL (stuck in the kernel?)")

    def run(self, timeout: float, force: bool) -> str:
        """The whole ladder; returns the stage that ended QEMU. Without `force`, a guest
        that does not power off in time raises GuestTimeout and is left running."""
        if wait_pidfd(self.pidfd, 0):
            return "already-exited"
        if self.graceful(timeout):
            return self.method
        if not force and self.method != "none":
            raise GuestTimeout(
                f"the guest did not power off within {timeout:g}s; it is still running",
                hint="stop it anyway with `kvmrun stop --force` (QMP quit, then SIGTERM, "
                     "then SIGKILL), or give it longer with --timeout")
        return self.hard()
