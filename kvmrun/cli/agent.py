"""Guest agent verbs: agent, exec, ip. They talk to qemu-guest-agent inside the guest over the
guest's `qga.sock` (profile `devices: [agent]`); kvmrun.ops.agent does the work."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from kvmrun.cli.app import app, emit_json, err, guest, json_object, out
from kvmrun.ops import agent as agentops

NameArg = typer.Argument(..., metavar="NAME",
                         help="A running guest whose profile lists the agent device.")
TimeoutOpt = typer.Option(agentops.DEFAULT_TIMEOUT, "--timeout", metavar="SECONDS", min=0.1,
                          help="How long to wait for each answer of the agent (exit 5 when "
                               "it does not answer).")


@app.command("agent")
def agent_cmd(
    name: str = NameArg,
    command: str = typer.Argument(..., metavar="COMMAND",
                                  help="An agent command, e.g. guest-info, guest-get-osinfo, "
                                       "guest-get-time, guest-fsfreeze-status."),
    arguments: Optional[str] = typer.Argument(None, metavar="[JSON-ARGS]",
                                              help="Its arguments as a JSON object."),
    timeout: float = TimeoutOpt,
) -> None:
    """Send one command to the guest agent and print its answer as JSON.

    Example: kvmrun agent web guest-exec-status '{"pid": 812}'

    Exit 5 when the agent does not answer within --timeout, 6 when it refuses the command."""
    args = json_object(arguments)
    emit_json(agentops.call(guest(name), command, args, timeout))


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_cmd(
    name: str = NameArg,
    argv: List[str] = typer.Argument(..., metavar="-- CMD [ARGS...]",
                                     help="The program (searched on the guest's PATH) and "
                                          "its arguments."),
    timeout: float = typer.Option(60.0, "--timeout", metavar="SECONDS", min=0.1,
                                  help="How long the command may run (exit 5 after)."),
    stdin: bool = typer.Option(False, "--stdin", help="Send kvmrun's standard input to the "
                                                     "command."),
) -> None:
    """Run a command in the guest through the agent (guest-exec): its stdout and stderr are
    printed and its exit code becomes kvmrun's (128+N when signal N ended it).

    Example: kvmrun exec web -- systemctl is-active nginx"""
    if argv and argv[0] == "--":        # typer keeps the separator once options stop
        argv = argv[1:]
    data = sys.stdin.buffer.read() if stdin else None
    result = agentops.run(guest(name), argv, timeout, stdin=data)
    sys.stdout.buffer.write(result["stdout"])
    sys.stdout.flush()
    sys.stderr.buffer.write(result["stderr"])
    sys.stderr.flush()
    if result["truncated"]:
        err("kvmrun: the agent truncated the command's output")
    raise typer.Exit(result["status"])


@app.command("ip")
def ip_cmd(name: str = NameArg, as_json: bool = typer.Option(False, "--json"),
           timeout: float = TimeoutOpt) -> None:
    """The guest's network interfaces and addresses, as the guest sees them (through the
    agent: also for bridged NICs, where kvmrun has no lease file)."""
    rows = agentops.addresses(guest(name), timeout)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        addr = f"{row['address']}/{row['prefix']}" if row["address"] else "-"
        out(f"{row['interface']:<12}{row['mac'] or '-':<19}{row['family'] or '-':<6}{addr}")
