"""The guest agent verbs' work: `agent` (one command), `exec` (a program in the guest through
guest-exec) and `ip` (the guest's addresses). Each finds a running guest whose QEMU has the
agent port (profile `devices: [agent]`), connects to its `qga.sock` and talks to
qemu-guest-agent through kvmrun.guest.agent, which resynchronises every connection and bounds
every read (AgentTimeout, exit 5, instead of a hang). `frozen` freezes and thaws a guest's
file systems around a live snapshot (kvmrun.ops.snapshots).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from kvmrun.errors import GuestError, KvmrunError, UsageError
from kvmrun.guest import agent as qga
from kvmrun.guest.rundir import Guest, require_running

DEFAULT_TIMEOUT = qga.DEFAULT_TIMEOUT


def connect(guest: Guest, timeout: float = DEFAULT_TIMEOUT) -> qga.Agent:
    """An unconnected client for the agent of `guest` (running, started with the agent port);
    use it as a context manager."""
    require_running(guest)
    launch = guest.launch_or_none()
    if launch is None or not qga.has_port(launch.argv):
        raise GuestError(f"{guest.name} was started without the guest agent port",
                         hint="add devices: [agent] to its profile (the guest needs "
                              "qemu-guest-agent) and restart it")
    return qga.Agent(guest.paths.qga, timeout=timeout, name=guest.name)


def call(guest: Guest, command: str, arguments: dict | None = None,
         timeout: float = DEFAULT_TIMEOUT):
    """One agent command; its "return" value."""
    with connect(guest, timeout) as client:
        return client.call(command, arguments)


def run(guest: Guest, argv: list[str], timeout: float, stdin: bytes | None = None) -> dict:
    """Run argv in the guest until it exits (AgentTimeout after `timeout` seconds):
    {"exitcode", "signal", "stdout", "stderr", "truncated", "status"}; status is the shell's
    exit status (the exit code, or 128 + the signal)."""
    if not argv:
        raise UsageError("give the command to run: kvmrun exec NAME -- CMD [ARGS...]")
    with connect(guest, DEFAULT_TIMEOUT) as client:
        result = qga.run_command(client, argv, timeout, stdin=stdin)
    return {**result, "status": qga.exit_status(result)}


def addresses(guest: Guest, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    """The guest's addresses as it sees them (guest-network-get-interfaces), one row per
    address: {interface, mac, family, address, prefix}."""
    return qga.addresses(call(guest, "guest-network-get-interfaces", timeout=timeout))


# ---------------------------------------------------------------- fsfreeze around a snapshot

PROBE_TIMEOUT = 5.0          # does the agent answer at all? (guest-sync-delimited)
FREEZE_TIMEOUT = 60.0        # guest-fsfreeze-freeze syncs every file system first
THAW_TIMEOUT = 30.0
THAW_TRIES = 3


class Quiesce:
    """What a live snapshot did about the guest's file systems: `frozen` (they were frozen
    while it was taken), `note` (why not, or what went wrong: one line)."""

    def __init__(self) -> None:
        self.frozen = False
        self.note: str | None = None
        self.client: qga.Agent | None = None


@contextlib.contextmanager
def frozen(guest: Guest, note: Callable[[str], None] = lambda m: None) -> Iterator[Quiesce]:
    """Freeze the guest's file systems through its agent (guest-fsfreeze-freeze) for the
    block, and thaw them (guest-fsfreeze-thaw) after it, also when it fails. An agent that
    is missing or does not answer within PROBE_TIMEOUT leaves them as they are: the block
    runs anyway (a crash-consistent snapshot) and `note` says why, in one line."""
    state = Quiesce()
    launch = guest.launch_or_none()
    if launch is None or not qga.has_port(launch.argv):
        state.note = "no guest agent port (devices: [agent]): the snapshot is crash-consistent"
    else:
        client = qga.Agent(guest.paths.qga, timeout=PROBE_TIMEOUT, name=guest.name)
        try:
            client.connect()
            state.client = client
            state.frozen = True           # from here on a thaw is owed, whatever happens
            client.call("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT)
        except KvmrunError as err:
            state.note = (f"the guest agent did not freeze the file systems "
                          f"({err.message}): the snapshot is crash-consistent")
            if state.client is None:
                client.close()
            else:
                _thaw(guest, state)       # a freeze cut short may have frozen some of them
            state.frozen = False
        if state.note:                    # the guest has an agent, which did not help
            note(f"kvmrun: note: {state.note}")
    try:
        yield state
    finally:
        if state.frozen:
            _thaw(guest, state)


def _thaw(guest: Guest, state: Quiesce) -> None:
    """guest-fsfreeze-thaw, retried on a fresh connection; GuestError if it never worked
    (the guest's file systems may still be frozen: say how to thaw them by hand)."""
    last: KvmrunError | None = None
    for _ in range(THAW_TRIES):
        client = state.client or qga.Agent(guest.paths.qga, timeout=THAW_TIMEOUT,
                                           name=guest.name)
        state.client = None
        try:
            if client.sock is None:
                client.connect()
            client.call("guest-fsfreeze-thaw", timeout=THAW_TIMEOUT)
            return
        except KvmrunError as err:
            last = err
        finally:
            client.close()
    raise GuestError(f"could not thaw the file systems of {guest.name}: {last.message}",
                     hint=f"they may still be frozen: kvmrun agent {guest.name} "
                          "guest-fsfreeze-thaw")


def thaw_if_frozen(guest: Guest) -> bool:
    """After a loadvm of a snapshot taken while frozen, the guest (and its agent) come back
    frozen: thaw them. True if they were; an agent that does not answer is left alone."""
    launch = guest.launch_or_none()
    if launch is None or not qga.has_port(launch.argv):
        return False
    try:
        with qga.Agent(guest.paths.qga, timeout=PROBE_TIMEOUT, name=guest.name) as client:
            if client.call("guest-fsfreeze-status") != "frozen":
                return False
    except KvmrunError:
        return False
    state = Quiesce()
    _thaw(guest, state)
    return True
