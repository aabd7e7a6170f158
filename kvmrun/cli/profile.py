"""Profile verbs: cmdline (the exact QEMU argv), validate, schema."""

from __future__ import annotations

import shlex
from typing import List, Optional

import typer

from kvmrun.cli.app import ONEOFF, SetOpt, app, emit_json, err, lazy, out
from kvmrun.errors import ProfileError, each_error

loader = lazy("kvmrun.ops.profiles")
profile = lazy("kvmrun.profile")
checks = lazy("kvmrun.qemu.checks")


@app.command()
def cmdline(
    profile_ref: Optional[str] = typer.Argument(None, metavar="[PROFILE]",
                                                help="Profile file or defined VM name."),
    sets: Optional[List[str]] = SetOpt,
    pretty: bool = typer.Option(False, "--pretty", help="One option per line."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of arguments."),
    name: Optional[str] = ONEOFF["name"], hda: Optional[str] = ONEOFF["hda"],
    disk: Optional[List[str]] = ONEOFF["disk"], cdrom: Optional[str] = ONEOFF["cdrom"],
    boot: Optional[str] = ONEOFF["boot"], memory: Optional[str] = ONEOFF["memory"],
    smp: Optional[int] = ONEOFF["smp"], arch: Optional[str] = ONEOFF["arch"],
    machine: Optional[str] = ONEOFF["machine"], accel: Optional[str] = ONEOFF["accel"],
    cpu: Optional[str] = ONEOFF["cpu"], kernel: Optional[str] = ONEOFF["kernel"],
    initrd: Optional[str] = ONEOFF["initrd"], append: Optional[str] = ONEOFF["append"],
    gdb: Optional[str] = ONEOFF["gdb"], halted: bool = ONEOFF["halted"],
) -> None:
    """Print the exact QEMU command line a profile compiles to.

    Helper daemons the guest needs (virtiofsd for a virtiofs share, swtpm for a TPM) come
    first, each on a comment line (`# helper NAME, started before QEMU: …`); --json prints
    QEMU's argv alone.

    Without a PROFILE, one-off flags describe the VM:
    `kvmrun cmdline --hda test.img --cdrom install.iso --boot d -m 2048`.
    """
    prof = loader.load_profile(profile_ref, sets, dict(
        name=name, hda=hda, disk=disk, cdrom=cdrom, boot=boot, memory=memory, smp=smp,
        arch=arch, machine=machine, accel=accel, cpu=cpu, kernel=kernel, initrd=initrd,
        append=append, gdb=gdb, halted=halted or None))
    for problem in checks.missing_files(prof) + profile.warnings(prof):
        err(f"kvmrun: warning: {problem}")
    compiled = loader.compiled(prof)
    argv = compiled.argv
    if as_json:
        emit_json(argv)
        return
    for helper in compiled.helpers:      # a comment line each: the output stays pasteable
        out(f"# helper {helper.name}, started before QEMU: {shlex.join(helper.argv)}")
    out(format_pretty(argv) if pretty else shlex.join(argv))


def format_pretty(argv: list[str]) -> str:
    """One option (with its value) per line, joined with ` \\` so it stays pasteable."""
    lines: list[list[str]] = [[argv[0]]]
    for arg in argv[1:]:
        if arg.startswith("-") and len(arg) > 1:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return " \\\n    ".join(shlex.join(line) for line in lines)


@app.command()
def validate(
    profiles: List[str] = typer.Argument(..., metavar="PROFILE...",
                                         help="Profile files or defined VM names."),
    sets: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Results as JSON."),
) -> None:
    """Check profiles without starting anything: keys, values, files, and the machine type
    and CPU model against the installed QEMU. Exit code 2 if any profile is wrong."""
    results = []
    worst = 0
    for ref in profiles:
        try:
            loaded = loader.load_profile(ref, sets or [])
            checks.check(loaded)
            warned = profile.warnings(loaded)
            results.append({"profile": ref, "ok": True, "errors": [], "warnings": [
                {"key": w.location.key, "message": w.reason, "hint": w.hint} for w in warned]})
            if not as_json:
                out(f"{ref}: ok")
                for warning in warned:
                    err(f"warning: {warning}")
        except ProfileError as e:
            errors = each_error(e)
            results.append({"profile": ref, "ok": False, "errors": [
                {"file": x.location.file, "line": x.location.line, "key": x.location.key,
                 "message": x.reason, "hint": x.hint} for x in errors]})
            if not as_json:
                err(str(e))
            worst = max(worst, e.exit_code)
    if as_json:
        emit_json(results)
    if worst:
        raise typer.Exit(worst)


@app.command()
def schema() -> None:
    """Print the JSON Schema of profiles (for editor completion and checking)."""
    emit_json(profile.json_schema())
