"""The entry point: `kvmrun VERB …` imports only the module of that verb and builds only
that command, then maps kvmrun's errors to exit codes (never a traceback, unless --debug).

typer builds every registered command's parameters from its signature (~20 ms for ~50
verbs), and importing every verb module would load the profile model, yaml and the compiler
for `kvmrun status`. So VERBS below names the module of each verb; for `--help`, no verb or
an unknown one, every module is imported so typer can list them and suggest names
(tests/unit/test_cli_layout.py checks the table against what the modules register).
"""

from __future__ import annotations

import importlib
import re
import signal
import sys

import typer

from kvmrun.cli import nopydantic
from kvmrun.cli.app import SETTINGS, app, err
from kvmrun.cli.text import failure
from kvmrun.ops.remote import split_hosts

VERBS: dict[str, str] = {
    "cmdline": "profile", "validate": "profile", "schema": "profile",
    "start": "launch", "run": "launch",
    "stop": "power", "kill": "power", "poweroff": "power", "destroy": "power",
    "pause": "power", "resume": "power", "reset": "power", "wait": "power", "qmp": "power",
    "console": "power", "logs": "power",
    "status": "inspect", "list": "inspect",
    "define": "defined", "undefine": "defined", "edit": "defined", "export": "defined",
    "import": "defined", "defined": "defined",
    "disk": "storage", "snapshot": "storage", "pool": "storage", "ssh": "storage",
    "net": "net", "doctor": "host", "systemd": "systemd",
    "autostart": "guests", "guests": "guests",
    "convert": "libvirt",
    "new": "new", "os": "new", "ui": "ui",
    "agent": "agent", "exec": "agent", "ip": "agent",
    "migrate": "migrate",
}
MODULES = ["profile", "launch", "power", "inspect", "defined", "libvirt", "host", "systemd",
           "guests",
           "storage", "net", "new", "ui", "agent", "migrate"]


GDB_VALUE = re.compile(r"(?:[\w.-]+:|\[[0-9a-fA-F:]+\]:)?\d+")


def optional_values(argv: list[str]) -> list[str]:
    """`--gdb` takes an optional value: `--gdb` alone (or before a non-port) means the
    private unix socket (gdb.sock in the run directory)."""
    fixed = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return fixed + argv[i:]
        if arg == "--gdb" and not (i + 1 < len(argv) and GDB_VALUE.fullmatch(argv[i + 1])):
            arg = "--gdb=unix"
        fixed.append(arg)
    return fixed


def _verb(argv: list[str]) -> str | None:
    """The verb of `kvmrun [--debug] [--run-dir DIR] VERB …`, or None (help, no verb)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--run-dir":
            i += 2
        elif arg == "--debug" or arg.startswith("--run-dir="):
            i += 1
        else:
            return None if arg.startswith("-") else arg
    return None


def _name(info) -> str:
    return info.name or typer.main.get_command_name(info.callback.__name__)


def build_command(argv: list[str]):
    """The click command for this call: with a known verb, a Typer of that one command
    (through Typer's public registries, app itself unchanged); else all of them."""
    verb = _verb(argv)
    if verb not in VERBS:
        for module in MODULES:
            importlib.import_module(f"kvmrun.cli.{module}")
        return typer.main.get_command(app)
    importlib.import_module(f"kvmrun.cli.{VERBS[verb]}")
    only = typer.Typer(**SETTINGS)
    only.registered_callback = app.registered_callback
    only.registered_commands = [c for c in app.registered_commands if _name(c) == verb]
    only.registered_groups = [g for g in app.registered_groups if g.name == verb]
    return typer.main.get_command(only)


def run(argv: list[str]) -> int:
    """One call: on this host, or (with -H/--host or $KVMRUN_HOST) through ssh on another
    (kvmrun.cli.hosts)."""
    hosts, argv = split_hosts(argv)
    if hosts:
        from kvmrun.cli import hosts as remote_cli
        code = remote_cli.dispatch(hosts, argv, _verb(argv), build_command)
        global _interrupted
        _interrupted = False       # an interrupted remote command said so itself
        return code
    command = build_command(argv)
    result = command.main(args=argv, prog_name="kvmrun", standalone_mode=False)
    return result if isinstance(result, int) else 0


_interrupted = False


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    nopydantic.install()             # plain values skip typer's pydantic (see nopydantic)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    argv = optional_values(sys.argv[1:] if argv is None else argv)
    try:
        code = run(argv)
        if code == 130 and _interrupted:     # typer turned Ctrl-C into a silent exit 130
            err("kvmrun: interrupted")
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        err("kvmrun: interrupted")
        code = 130
    except typer.TyperException as e:           # usage errors: bad flags, missing arguments
        e.show() if hasattr(e, "show") else err(f"kvmrun: error: {e.format_message()}")
        code = e.exit_code
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - the last line of defence
        code = failure(e)                        # kvmrun.cli.text: no tracebacks
    sys.stdout.flush()
    sys.exit(code)
