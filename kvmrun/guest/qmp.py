"""The one place that speaks QMP: a small synchronous client with a timeout on every wait.

Why not qemu.qmp here: it is asyncio-based, and importing asyncio plus qemu.qmp costs about
3 MiB of memory in each supervisor and tens of milliseconds in each CLI call (see the README's
Performance section). The protocol we need is a few JSON lines; qemu.qmp remains the
independent client our tests check QEMU with.

QEMU serves one client per monitor socket, so the supervisor and the CLI use different
sockets (qmp.sock and qmp-cli.sock), and the CLI never holds its connection while waiting.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from kvmrun.errors import GuestError, QMPError


class QMPClient:
    def __init__(self, path: Path | str, timeout: float = 5.0):
        self.path = str(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = b""
        self.pending_events: list[dict] = []
        self.greeting: dict = {}

    # ---------------------------------------------------------------- connection
    def connect(self) -> "QMPClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise GuestError(f"no QMP socket at {self.path}") from None
        except (ConnectionRefusedError, socket.timeout, BlockingIOError) as err:
            sock.close()     # EAGAIN: a full listen backlog (a hung QEMU)
            raise GuestError(f"QMP socket {self.path} does not answer ({err})") from None
        except OSError as err:
            sock.close()
            raise GuestError(f"cannot connect to QMP socket {self.path}: "
                             f"{err.strerror or err}") from None
        self.sock = sock
        try:
            self.greeting = self._read_message(self.timeout)
            if "QMP" not in self.greeting:
                raise QMPError(f"unexpected QMP greeting: {str(self.greeting)[:200]}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.sock:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "QMPClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    # ---------------------------------------------------------------- messages
    def _read_line(self, timeout: float | None) -> bytes:
        assert self.sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _read_message(self, timeout: float | None) -> dict:
        try:
            line = self._read_line(timeout)
        except TimeoutError:
            raise QMPError(f"QMP did not answer within {timeout:g}s ({self.path})") from None
        except EOFError:
            raise QMPError("QEMU closed the QMP connection") from None
        except OSError as err:
            raise QMPError(f"QMP connection failed: {err}") from None
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP sent something that is not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QMPError(f"QMP sent something that is not an object: {line[:200]!r}")
        return message

    def execute(self, command: str, arguments: dict | None = None,
                timeout: float | None = None, fds: list[int] = ()) -> object:
        """Run a command and return its `return` value; QMPError for an `error` reply.
        Events that arrive meanwhile are kept in `pending_events`. `fds` go along with
        the command (SCM_RIGHTS), for `getfd`."""
        if self.sock is None:
            raise QMPError("not connected")
        message: dict = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            data = json.dumps(message).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            if data:
                self.sock.sendall(data)
        except OSError as err:
            raise QMPError(f"QMP connection failed: {err}") from None
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            reply = self._read_message(max(0.001, deadline - time.monotonic()))
            if "event" in reply:
                self.pending_events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QMPError(f"{command}: {err.get('desc', reply['error'])}", command,
                               err.get("class"))
            return reply.get("return")

    def read_event(self, timeout: float | None) -> dict | None:
        """The next event, or None on timeout. EOFError when QEMU closed the connection."""
        if self.pending_events:
            return self.pending_events.pop(0)
        try:
            return json.loads(self._read_line(timeout))
        except TimeoutError:
            return None


def query(path: Path | str, command: str, arguments: dict | None = None,
          timeout: float = 5.0) -> object:
    """Connect, run one command, disconnect."""
    with QMPClient(path, timeout) as client:
        return client.execute(command, arguments)
