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
        lines.append(f"  gdb:     target remote {gdb}")
    if halted:
        lines.append(f"  halted:  vCPUs stopped; `kvmrun resume {name}` or gdb's continue "
                     "starts them")
    return lines
