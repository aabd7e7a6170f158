"""Starting guests: start (a detached supervisor), run (the supervisor in the foreground)."""

from __future__ import annotations

from typing import List, Optional

import typer

from kvmrun.cli.app import ONEOFF, SetOpt, app, emit_json, err, guest, lazy, out
from kvmrun.cli.text import gdb_warning, started

launch = lazy("kvmrun.ops.launch")
systemd = lazy("kvmrun.ops.systemd")
loader = lazy("kvmrun.ops.profiles")
disks = lazy("kvmrun.storage.disks")


@app.command()
def start(
    profile_ref: Optional[str] = typer.Argument(None, metavar="PROFILE|NAME"),
    name: Optional[str] = typer.Option(None, "--name", help="Run under another name."),
    sets: Optional[List[str]] = SetOpt,
    wait_ready: bool = typer.Option(True, "--wait-ready/--no-wait-ready",
                                    help="Wait for the profile's ready.console pattern (or, with "
                                         "ready.cloud_init, for cloud-init to finish)."),
    ephemeral: bool = typer.Option(False, "--ephemeral",
                                   help="Throwaway run: every writable disk gets an overlay "
                                        "that is deleted when the guest stops."),
    as_json: bool = typer.Option(False, "--json"),
    hda: Optional[str] = ONEOFF["hda"], cdrom: Optional[str] = ONEOFF["cdrom"],
    memory: Optional[str] = ONEOFF["memory"], kernel: Optional[str] = ONEOFF["kernel"],
    initrd: Optional[str] = ONEOFF["initrd"], append: Optional[str] = ONEOFF["append"],
    gdb: Optional[str] = ONEOFF["gdb"], halted: bool = ONEOFF["halted"],
    no_unit: bool = typer.Option(False, "--no-unit",
                                 help="Start it here even when kvmrun@NAME is enabled "
                                      "(systemd does not supervise that run)."),
) -> None:
    """Start a guest in the background under its own supervisor.

    Returns once QEMU's monitor answers (and, with `ready: {console: REGEX}` in the
    profile, once the serial console printed a match; not with --halted). A defined VM
    whose kvmrun@NAME unit is enabled starts through `systemctl start` (--no-unit: here)."""
    given = {"--name": name, "--set": sets, "--ephemeral": ephemeral, "--hda": hda,
             "--cdrom": cdrom, "--memory": memory, "--kernel": kernel, "--initrd": initrd,
             "--append": append, "--gdb": gdb, "--halted": halted}
    unit = None if no_unit or profile_ref is None else systemd.unit_for(profile_ref)
    if unit:
        systemd.refuse_options(unit, [k for k, v in given.items() if v])
        systemd.start_unit(unit, wait=wait_ready)
        _started_by_unit(profile_ref, unit, wait_ready, as_json)
        return
    prof = loader.load_profile(profile_ref, sets, dict(
        name=name, hda=hda, cdrom=cdrom, memory=memory, kernel=kernel, initrd=initrd,
        append=append, gdb=gdb, halted=halted or None))
    if ephemeral:
        prof = disks.all_ephemeral(prof)
    result = launch.start(prof, wait_ready=wait_ready, note=err)
    paths = guest(prof.name).paths
    info = {**result, "console_log": str(paths.serial_log),
            "console_socket": str(paths.console), "qmp": str(paths.qmp_cli),
            "run_dir": str(paths.dir)}
    if as_json:
        emit_json(info)
        return
    for line in started(prof.name, result, paths, prof.gdb, prof.halted):
        out(line)
    if gdb_warning(prof.gdb):
        err(gdb_warning(prof.gdb))


def _started_by_unit(name: str, unit: str, waited: bool, as_json: bool) -> None:
    target = guest(name)
    state = target.read_state() or {}
    info = {"name": name, "unit": unit, "via": "systemctl", "pid": target.qemu_pid(state),
            "ready": bool(state.get("ready")), "console_log": str(target.paths.serial_log),
            "console_socket": str(target.paths.console), "qmp": str(target.paths.qmp_cli),
            "run_dir": str(target.paths.dir)}
    if as_json:
        emit_json(info)
        return
    out(f"started {name} through {unit}" + ("" if waited else " (not waiting: --no-block)"))
    out(f"  console: kvmrun console {name}   log: {target.paths.serial_log}")
    out(f"  unit:    systemctl status {unit}   (--no-unit starts it outside the unit)")


@app.command()
def run(
    profile_ref: Optional[str] = typer.Argument(None, metavar="PROFILE|NAME"),
    name: Optional[str] = typer.Option(None, "--name", help="Run under another name."),
    sets: Optional[List[str]] = SetOpt,
    console: bool = typer.Option(False, "--console",
                                 help="Put the serial console on this terminal (Ctrl-] "
                                      "stops the guest)."),
    rm: bool = typer.Option(False, "--rm", help="Throwaway VM: disks write to overlays "
                                                "and the run directory is removed at the end."),
    kernel: Optional[str] = ONEOFF["kernel"], initrd: Optional[str] = ONEOFF["initrd"],
    append: Optional[str] = ONEOFF["append"], memory: Optional[str] = ONEOFF["memory"],
    gdb: Optional[str] = ONEOFF["gdb"], halted: bool = ONEOFF["halted"],
) -> None:
    """Run a guest in the foreground (for systemd, scripts and embedded work).

    Ctrl-C or SIGTERM stops the guest gracefully (then escalates). Exit code: 0 powered
    off or stopped gracefully, 7 QEMU failed to start, 8 crashed, 9 guest panicked,
    10 stop escalated, 11 killed."""
    prof = loader.load_profile(profile_ref, sets, dict(
        name=name, kernel=kernel, initrd=initrd, append=append, memory=memory, gdb=gdb,
        halted=halted or None))
    if not rm:
        raise typer.Exit(launch.run_foreground(prof, note=err, console=console))
    try:
        code = launch.run_foreground(disks.all_ephemeral(prof), note=err, console=console)
    finally:
        ended = guest(prof.name)
        if ended.qemu_pid() is None:
            ended.remove_dir()
    raise typer.Exit(code)
