"""A small synchronous client for the QEMU guest agent (qemu-guest-agent in the guest).

QEMU exposes the guest's agent port (`devices: [agent]`, a virtserialport named
org.qemu.guest_agent.0) as the unix socket `qga.sock` in the guest's run directory. The
protocol is QMP's JSON framing without a greeting: one command object out, one
`{"return": …}` or `{"error": {"class", "desc"}}` line back. The channel has no session, so
a reply meant for an earlier client can still be in the pipe: every connection first sends
0xFF and `guest-sync-delimited` with a random id, skips everything up to the 0xFF byte the
agent puts before its reply, and reads until the reply carries that id.

Every read has a deadline: an agent that is not running (or not installed) in the guest never
answers, and that becomes `AgentTimeout` (exit 5) within the timeout, never a hang. Stdlib
only, like the rest of the guest wing (kvmrun.ops.agent finds a guest's socket and uses this).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from kvmrun.errors import AgentError, AgentTimeout, GuestError

AGENT_PORT = "org.qemu.guest_agent.0"       # the virtserialport QEMU gives the agent
DEFAULT_TIMEOUT = 10.0
DELIMITER = b"\xff"
# Commands that answer nothing when they succeed (the guest goes away).
NO_REPLY = frozenset({"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram",
                      "guest-suspend-hybrid"})
NOT_ANSWERING_HINT = ("is qemu-guest-agent installed and running in the guest (systemctl "
                      "status qemu-guest-agent)? It starts when its port appears, so also "
                      "after boot; another client holding the socket blocks this one too")


def has_port(argv: list[str]) -> bool:
    """Whether a guest's QEMU command line has the agent port (profile `devices: [agent]`)."""
    return any(f"name={AGENT_PORT}" in str(arg) for arg in argv)


class Agent:
    """One connection to a guest agent socket: `with Agent(path) as a: a.call(...)`."""

    def __init__(self, path: str | Path, timeout: float = DEFAULT_TIMEOUT, name: str = "guest"):
        self.path, self.timeout, self.name = str(path), timeout, name
        self.sock: socket.socket | None = None
        self.buf = b""

    # ------------------------------------------------------------ connection
    def __enter__(self) -> "Agent":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        import socket      # here: the compiler reads AGENT_PORT on every start (~3 ms)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError as err:
            sock.close()
            raise GuestError(f"{self.name} has no guest agent socket ({self.path})",
                             hint="add the agent port to its profile (devices: [agent]) "
                                  "and restart it") from err
        except OSError as err:
            sock.close()
            raise GuestError(f"cannot connect to the guest agent of {self.name}: "
                             f"{err.strerror or err}") from err
        self.sock = sock
        self.sync()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------ framing
    def _send(self, message: dict, prefix: bytes = b"") -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(prefix + json.dumps(message).encode() + b"\n")
        except TimeoutError as err:
            raise AgentTimeout(f"the guest agent of {self.name} takes no input (waited "
                               f"{self.timeout:g}s)", hint=NOT_ANSWERING_HINT) from err
        except OSError as err:
            raise GuestError(f"lost the guest agent of {self.name}: {err.strerror}") from err

    def _fill(self, deadline: float, what: str) -> None:
        """Read more bytes into the buffer, or raise when the deadline has passed."""
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"the guest agent of {self.name} did not answer {what} within "
                               f"{self.timeout:g}s", hint=NOT_ANSWERING_HINT)
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            chunk = None
        except OSError as err:
            raise GuestError(f"lost the guest agent of {self.name}: {err.strerror}") from err
        if chunk is None:
            raise AgentTimeout(f"the guest agent of {self.name} did not answer {what} within "
                               f"{self.timeout:g}s", hint=NOT_ANSWERING_HINT)
        if not chunk:
            raise GuestError(f"the guest agent socket of {self.name} closed while waiting "
                             f"for {what} (the guest stopped?)")
        self.buf += chunk

    def _line(self, deadline: float, what: str) -> dict | None:
        """The next JSON line (None for a line that is not a JSON object: noise)."""
        while b"\n" not in self.buf:
            self._fill(deadline, what)
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip().lstrip(DELIMITER)
        if not line:
            return None
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def sync(self) -> None:
        """Resynchronise: drop whatever an earlier client left unread."""
        token = int.from_bytes(os.urandom(4)) % (2**31 - 1) + 1   # (random: ~1.5 ms a start)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}},
                   prefix=DELIMITER)
        deadline = time.monotonic() + self.timeout
        while DELIMITER not in self.buf:          # skip stale output up to the delimiter
            self.buf = b""
            self._fill(deadline, "guest-sync-delimited")
        self.buf = self.buf[self.buf.index(DELIMITER) + 1:]
        while True:
            reply = self._line(deadline, "guest-sync-delimited")
            if reply is not None and reply.get("return") == token:
                return

    # ------------------------------------------------------------ commands
    def call(self, command: str, arguments: dict | None = None,
             timeout: float | None = None):
        """Run one agent command; its "return" value (None for commands without a reply)."""
        message: dict = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        if command in NO_REPLY:
            return None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._line(deadline, command)
            if reply is None:
                continue
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise AgentError(command, str(error.get("class", "GenericError")),
                                 str(error.get("desc", reply["error"])))
            if "return" in reply:
                return reply["return"]


# ---------------------------------------------------------------- guest-exec

def run_command(agent: Agent, argv: list[str], timeout: float, stdin: bytes | None = None,
                poll: float = 0.1) -> dict:
    """Run argv in the guest (guest-exec, then guest-exec-status until it exits).
    Returns {"exitcode", "signal", "stdout": bytes, "stderr": bytes, "truncated"}."""
    args: dict = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if stdin:
        args["input-data"] = base64.b64encode(stdin).decode()
    pid = agent.call("guest-exec", args)["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = agent.call("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise AgentTimeout(f"{argv[0]} (pid {pid} in the guest) did not finish within "
                               f"{timeout:g}s", hint="it keeps running in the guest; give "
                                                    "more time with --timeout")
        time.sleep(poll)
        poll = min(poll * 1.5, 1.0)
    return {"exitcode": status.get("exitcode"), "signal": status.get("signal"),
            "stdout": base64.b64decode(status.get("out-data", "")),
            "stderr": base64.b64decode(status.get("err-data", "")),
            "truncated": bool(status.get("out-truncated") or status.get("err-truncated"))}


def exit_status(result: dict) -> int:
    """The shell's convention: the exit code, or 128 + the signal that ended it."""
    if result.get("signal") is not None:
        return 128 + int(result["signal"])
    return int(result.get("exitcode") or 0)


def addresses(interfaces: list[dict]) -> list[dict]:
    """guest-network-get-interfaces, flattened: one row per address."""
    rows = []
    for iface in interfaces:
        for addr in iface.get("ip-addresses", []) or [{}]:
            rows.append({"interface": iface.get("name"), "mac": iface.get("hardware-address"),
                         "family": addr.get("ip-address-type"),
                         "address": addr.get("ip-address"), "prefix": addr.get("prefix")})
    return rows
