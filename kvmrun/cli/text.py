"""Text the CLI prints that more than one entry point shares (no typer here: the quick
start path prints it too)."""

from __future__ import annotations

from kvmrun.paths import RunPaths


def started(name: str, result: dict, paths: RunPaths, gdb: str | None,
            halted: bool) -> list[str]:
    """What `kvmrun start` prints once the guest is up."""
    lines = [f"started {name} (pid {result.get('pid')})" + (", ready" if result.get("ready")
                                                            else ""),
             f"  console: kvmrun console {name}   log: {paths.serial_log}",
             f"  qmp:     {paths.qmp_cli}"]
    if gdb:
        lines.append(f"  gdb:     target remote {paths.gdb if gdb == 'unix' else gdb}")
    if halted:
        lines.append(f"  halted:  vCPUs stopped; `kvmrun resume {name}` or gdb's continue "
                     "starts them")
    return lines


def gdb_warning(gdb: str | None) -> str | None:
    """The warning a gdb stub on TCP deserves (`gdb: true` is a private unix socket)."""
    if not gdb or gdb == "unix":
        return None
    return (f"kvmrun: warning: the gdb stub listens on TCP {gdb}: any local user can pause "
            "this guest and read its memory (`gdb: true` uses a private unix socket)")
