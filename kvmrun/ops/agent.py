"""The guest agent verbs' work: `agent` (one command), `exec` (a program in the guest through
guest-exec) and `ip` (the guest's addresses). Each finds a running guest whose QEMU has the
agent port (profile `devices: [agent]`), connects to its `qga.sock` and talks to
qemu-guest-agent through kvmrun.guest.agent, which resynchronises every connection and bounds
every read (AgentTimeout, exit 5, instead of a hang).
"""

from __future__ import annotations


from kvmrun.errors import GuestError, UsageError
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
