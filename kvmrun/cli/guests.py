"""libvirt-guests' verbs: autostart (mark a defined VM), guests start|stop (what
kvmrun-guests.service runs at boot and at shutdown)."""

from __future__ import annotations

from typing import Optional

import typer

from kvmrun.cli.app import app, emit_json, err, lazy, out
from kvmrun.errors import UsageError

guests = lazy("kvmrun.ops.guests")

guests_app = typer.Typer(
    help="Start the VMs marked with `kvmrun autostart` (at boot) and stop every guest "
         "running outside its kvmrun@NAME unit (at shutdown): what kvmrun-guests.service "
         "runs (`kvmrun systemd install --guests`).", no_args_is_help=True)
app.add_typer(guests_app, name="guests")


@app.command()
def autostart(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]",
                                         help="A defined VM (none: list the marked ones)."),
    disable: bool = typer.Option(False, "--disable", help="Remove the mark."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Mark a defined VM to start at boot, as `virsh autostart NAME [--disable]` does.

    kvmrun-guests.service starts the marked VMs (`kvmrun guests start`); the mark is a
    link in <config dir>/autostart/, not a profile key, so exports do not carry it."""
    if name is None:
        if disable:
            raise UsageError("--disable needs a NAME")
        names = guests.autostart_names()
        if as_json:
            emit_json(names)
        else:
            for marked in names:
                out(marked)
        return
    changed = guests.set_autostart(name, not disable)
    if as_json:
        emit_json({"name": name, "autostart": not disable, "changed": changed})
        return
    if disable:
        out(f"{name}: autostart disabled" if changed else f"{name} was not marked autostart")
    else:
        out(f"{name}: marked autostart" if changed else f"{name} is already marked autostart")


ROW = {"started": "started (pid {pid})", "running": "already running",
       "unit": "skipped: {unit} is enabled, systemd starts it", "failed": "failed: {error}",
       "stopped": "stopped ({stage})"}


def _report(rows: list[dict], as_json: bool, none: str) -> None:
    if as_json:
        emit_json(rows)
    elif not rows:
        out(none)
    for row in rows if not as_json else ():
        out(f"{row['name']}: " + ROW[row["result"]].format(**{"pid": None, **row}))
    if any(row["result"] == "failed" for row in rows):
        raise typer.Exit(1)


@guests_app.command("start")
def start_marked(as_json: bool = typer.Option(False, "--json")) -> None:
    """Start the VMs marked with `kvmrun autostart` (not those already running, nor
    those enabled as kvmrun@NAME). Each returns once QMP answers; exit 1 if one failed."""
    _report(guests.start_marked(note=err), as_json, "no VM is marked autostart")


@guests_app.command("stop")
def stop_all(as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop every guest running outside its own kvmrun@NAME unit (systemd stops those),
    all at once, each as `kvmrun stop --force` does: the profile's shutdown method and
    timeout, then QMP quit, SIGTERM, SIGKILL. Exit 1 if one could not be stopped."""
    _report(guests.stop_all(note=err), as_json, "no guest runs outside a unit")
