"""`kvmrun migrate`: move a guest to another host over ssh (kvmrun.ops.migrate); its other
half there, `kvmrun migrate-target STEP`, is served before typer (kvmrun.cli.quick)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from kvmrun.cli.app import NameArg, app, emit_json, err, lazy, out

migration = lazy("kvmrun.ops.migrate")


def _note():
    """Progress on a terminal (one line, redrawn); warnings always."""
    tty = sys.stderr.isatty()

    def note(message: str) -> None:
        if message.startswith("warning: "):
            err(("\n" if tty else "") + f"kvmrun: {message}")
        elif tty:
            sys.stderr.write(f"\r{message}\033[K")
            sys.stderr.flush()
    return note


@app.command()
def migrate(
    name: str = NameArg,
    to: str = typer.Option(..., "--to", metavar="[USER@]HOST[:PORT]",
                           help="Where to: anything ssh reaches ($KVMRUN_SSH)."),
    offline: Optional[bool] = typer.Option(None, "--offline/--live",
                                           help="Offline: move a stopped, defined VM with "
                                                "its disks. Default: live when it runs."),
    copy_storage: bool = typer.Option(False, "--copy-storage",
                                      help="Mirror every writable disk to the target "
                                           "(drive-mirror to NBD); backing chains arrive "
                                           "flattened."),
    shared_storage: bool = typer.Option(False, "--shared-storage",
                                        help="The target sees the same disk files."),
    target_dir: Optional[str] = typer.Option(None, "--target-dir", metavar="DIR",
                                             help="Copied disks go to DIR there (default: "
                                                  "the same paths)."),
    downtime: int = typer.Option(100, "--downtime", metavar="MS",
                                 help="Downtime limit to start from; doubled every few "
                                      "seconds while it does not converge, up to "
                                      "--max-downtime, then the migration gives up."),
    max_downtime: Optional[int] = typer.Option(None, "--max-downtime", metavar="MS",
                                               help="The cap of those steps (default 20x "
                                                    "--downtime, at least 2000)."),
    bandwidth: Optional[int] = typer.Option(None, "--bandwidth", metavar="MIB",
                                            help="Cap the migration stream, MiB/s."),
    keep_source: bool = typer.Option(False, "--keep-source-definition",
                                     help="Keep the VM defined here too."),
    as_json: bool = typer.Option(False, "--json", help="The result as JSON."),
) -> None:
    """Move a guest to another host over ssh: live (RAM, device state and, with
    --copy-storage, its disks, through unix sockets forwarded by `ssh -L`) or --offline.

    A preflight there checks QEMU, the exact machine type, forwarded ports and disks before
    anything starts. Any failure (Ctrl-C too) undoes everything on the target and leaves the
    guest running here. Afterwards the guest runs there (defined there; undefined here unless
    --keep-source-definition) and `kvmrun status NAME` here says "migrated to HOST".
    """
    from kvmrun.ops.remote import parse_host
    result = migration.migrate(name, parse_host(to), offline=offline,
                               copy_storage=copy_storage, shared_storage=shared_storage,
                               target_dir=target_dir, downtime=downtime, cap=max_downtime,
                               bandwidth=bandwidth,
                               keep_source=keep_source, note=_note())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if as_json:
        emit_json(result)
        return
    line = f"migrated {name} to {to} ({result['mode']}"
    if result.get("downtime_ms") is not None:
        line += f", downtime {result['downtime_ms']} ms, {result['total_seconds']} s in all"
    out(line + ")")
