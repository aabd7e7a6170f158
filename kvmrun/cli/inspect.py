"""Verbs that look at guests: status, list (what they print: kvmrun.cli.views). Light: no
profile machinery (the lazy-import test pins what they load)."""

from __future__ import annotations

import typer

from kvmrun.cli.app import NameArg, app, emit_json, guest, out
from kvmrun.cli.views import list_lines, status_lines
from kvmrun.ops import inspect


@app.command()
def status(name: str = NameArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """State, resources, disks, forwards and paths of a guest; for a stopped guest, how
    and when it ended."""
    info = inspect.status(guest(name))
    if as_json:
        emit_json(info)
        return
    for line in status_lines(info):
        out(line)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json"),
    all_: bool = typer.Option(False, "--all", help="Also defined VMs that are not running."),
    defined: bool = typer.Option(False, "--defined", help="Only defined VMs."),
) -> None:
    """One line per guest: state, PID, memory, vCPUs, uptime."""
    live = inspect.list_guests()
    rows = [] if defined else live
    if all_ or defined:
        from kvmrun.ops.defined import defined_rows     # yaml and the profile model
        known = {r["name"] for r in rows}
        rows += [r for r in defined_rows(live) if r["name"] not in known]
    if as_json:
        emit_json(rows)
        return
    for line in list_lines(rows):
        out(line)
