"""The kvmrun command line: one small function per verb over library calls.

Exit codes: 0 ok · 1 error · 2 bad profile or usage · 3 host problem · 4 guest not in the
needed state · 5 timed out · 6 QMP error · 7 QEMU failed to start · 130 interrupted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from typing import List, Optional

import typer

from kvmrun.errors import KvmrunError

app = typer.Typer(
    name="kvmrun",
    help="Run KVM/QEMU virtual machines from YAML profiles, without libvirt.\n\n"
         "A PROFILE is a .yaml file or the name of a defined VM (`kvmrun define`).\n\n"
         "Environment: KVMRUN_RUN_DIR, KVMRUN_CONFIG_DIR, KVMRUN_DATA_DIR, KVMRUN_CACHE_DIR "
         "move kvmrun's directories; KVMRUN_ACCEL=kvm|tcg forces the accelerator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override a profile key, e.g. --set memory=4G --set "
                           "disks.0.cache=unsafe (repeatable).")


def out(text: str = "") -> None:
    """All normal output goes through here."""
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")


def emit_json(value) -> None:
    out(json.dumps(value, indent=2, sort_keys=False))


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", envvar="KVMRUN_DEBUG",
                               help="Show tracebacks and the exact QEMU command lines."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", metavar="DIR",
                                          help="Run directory (default: $KVMRUN_RUN_DIR, "
                                               "/run/kvmrun for root, "
                                               "$XDG_RUNTIME_DIR/kvmrun otherwise)."),
) -> None:
    _state["debug"] = debug
    if run_dir:
        os.environ["KVMRUN_RUN_DIR"] = os.path.abspath(run_dir)


# ---------------------------------------------------------------- profiles

def _profile_from(ref: Optional[str], sets: Optional[List[str]], oneoff: dict):
    from kvmrun import profile, store
    from kvmrun.errors import ProfileError, Location
    flags = {k: v for k, v in oneoff.items() if v not in (None, [], ())}
    if ref is None:
        if not flags:
            raise ProfileError(Location("command line"),
                               "give a PROFILE, or one-off flags such as --hda IMAGE -m 2G")
        data = _oneoff_mapping(flags)
        lines = {(): ("command line", None)}
        return profile.from_mapping(data, lines, "command line", sets or [])
    loaded = store.resolve(ref, sets or [])
    if flags:
        data = profile.to_dict(loaded)
        data.update(_oneoff_mapping(flags, data))
        return profile.from_mapping(data, dict(loaded.lines), loaded.source or ref,
                                    source=loaded.source)
    return loaded


def _oneoff_mapping(flags: dict, base: dict | None = None) -> dict:
    """Quick one-off flags (`--hda test.img --cdrom x.iso --boot d -m 2048`) as profile keys."""
    data: dict = {}
    disks = list((base or {}).get("disks", []))
    if flags.get("hda"):
        disks.insert(0, {"path": os.path.abspath(flags["hda"]), "interface": "ide"})
    for path in flags.get("disk") or []:
        disks.append({"path": os.path.abspath(path)})
    if disks:
        data["disks"] = disks
    if flags.get("cdrom"):
        data["cdrom"] = os.path.abspath(flags["cdrom"])
    kernel = {k: flags[k] for k in ("initrd", "append") if flags.get(k)}
    if flags.get("kernel"):
        kernel["path"] = flags["kernel"]
    for key in ("path", "initrd"):
        if key in kernel:
            kernel[key] = os.path.abspath(kernel[key])
    if kernel:
        data["kernel"] = kernel
    for key in ("name", "arch", "machine", "accel", "cpu", "smp", "memory", "boot"):
        if flags.get(key) is not None:
            data[key] = flags[key]
    if flags.get("gdb") is not None:
        data["gdb"] = flags["gdb"]
    if flags.get("halted"):
        data["halted"] = True
    if base is None:
        data.setdefault("name", "vm")
    return data


def _oneoff_options():
    """The one-off flags shared by cmdline, start and run."""
    return dict(
        name=typer.Option(None, "--name", help="VM name."),
        hda=typer.Option(None, "--hda", metavar="IMAGE", help="First hard disk (IDE)."),
        disk=typer.Option(None, "--disk", metavar="IMAGE", help="A virtio disk (repeatable)."),
        cdrom=typer.Option(None, "--cdrom", metavar="ISO", help="CD-ROM image."),
        boot=typer.Option(None, "--boot", metavar="ORDER", help="Boot order: c, d, n, e.g. dc."),
        memory=typer.Option(None, "-m", "--memory", metavar="SIZE", help="RAM: 2048, 512M, 2G."),
        smp=typer.Option(None, "--smp", metavar="N", help="vCPUs."),
        arch=typer.Option(None, "--arch", help="Guest architecture."),
        machine=typer.Option(None, "--machine", help="QEMU machine type."),
        accel=typer.Option(None, "--accel", help="auto, kvm or tcg."),
        cpu=typer.Option(None, "--cpu", help="CPU model."),
        kernel=typer.Option(None, "--kernel", metavar="FILE", help="Direct kernel boot."),
        initrd=typer.Option(None, "--initrd", metavar="FILE", help="Initial ramdisk."),
        append=typer.Option(None, "--append", metavar="CMDLINE", help="Kernel command line."),
        gdb=typer.Option(None, "--gdb", metavar="[PORT]",
                         help="gdb stub on 127.0.0.1:1234, or on PORT / HOST:PORT "
                              "(`target remote :1234`)."),
        halted=typer.Option(False, "--halted",
                            help="Start with vCPUs stopped (`kvmrun resume` or gdb's "
                                 "`continue` starts them)."),
    )


_ONEOFF = _oneoff_options()


@app.command()
def cmdline(
    profile_ref: Optional[str] = typer.Argument(None, metavar="[PROFILE]",
                                                help="Profile file or defined VM name."),
    sets: Optional[List[str]] = SetOpt,
    pretty: bool = typer.Option(False, "--pretty", help="One option per line."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of arguments."),
    name: Optional[str] = _ONEOFF["name"], hda: Optional[str] = _ONEOFF["hda"],
    disk: Optional[List[str]] = _ONEOFF["disk"], cdrom: Optional[str] = _ONEOFF["cdrom"],
    boot: Optional[str] = _ONEOFF["boot"], memory: Optional[str] = _ONEOFF["memory"],
    smp: Optional[int] = _ONEOFF["smp"], arch: Optional[str] = _ONEOFF["arch"],
    machine: Optional[str] = _ONEOFF["machine"], accel: Optional[str] = _ONEOFF["accel"],
    cpu: Optional[str] = _ONEOFF["cpu"], kernel: Optional[str] = _ONEOFF["kernel"],
    initrd: Optional[str] = _ONEOFF["initrd"], append: Optional[str] = _ONEOFF["append"],
    gdb: Optional[str] = _ONEOFF["gdb"], halted: bool = _ONEOFF["halted"],
) -> None:
    """Print the exact QEMU command line a profile compiles to.

    Without a PROFILE, one-off flags describe the VM:
    `kvmrun cmdline --hda test.img --cdrom install.iso --boot d -m 2048`.
    """
    from kvmrun import compile as compiler, host, paths, storage
    from kvmrun.profile import missing_files, warnings
    prof = _profile_from(profile_ref, sets, dict(
        name=name, hda=hda, disk=disk, cdrom=cdrom, boot=boot, memory=memory, smp=smp,
        arch=arch, machine=machine, accel=accel, cpu=cpu, kernel=kernel, initrd=initrd,
        append=append, gdb=gdb, halted=halted or None))
    for problem in missing_files(prof) + warnings(prof):
        err(f"kvmrun: warning: {problem}")
    prof = storage.with_formats(prof)
    argv = compiler.compile(prof, host.probe(), paths.RunPaths.for_guest(prof.name))
    if as_json:
        emit_json(argv)
    elif pretty:
        out(format_pretty(argv))
    else:
        out(shlex.join(argv))


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
    from kvmrun import checks, store
    from kvmrun.errors import ProfileError
    from kvmrun.profile import warnings
    from kvmrun.spec import ProfileErrors
    results = []
    worst = 0
    for ref in profiles:
        try:
            loaded = store.resolve(ref, sets or [])
            checks.check(loaded)
            warned = warnings(loaded)
            results.append({"profile": ref, "ok": True, "errors": [], "warnings": [
                {"key": w.location.key, "message": w.reason, "hint": w.hint} for w in warned]})
            if not as_json:
                out(f"{ref}: ok")
                for warning in warned:
                    err(f"warning: {warning}")
        except ProfileError as e:
            errors = e.errors if isinstance(e, ProfileErrors) else [e]
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
    from kvmrun.profile import json_schema
    emit_json(json_schema())


from kvmrun import cli_guest  # noqa: E402,F401  (registers the lifecycle verbs)
from kvmrun import cli_store  # noqa: E402,F401  (registers the store verbs)
from kvmrun import cli_host  # noqa: E402,F401  (registers doctor)
from kvmrun import cli_systemd  # noqa: E402,F401  (registers the systemd verbs)
from kvmrun import cli_storage  # noqa: E402,F401  (registers disk, snapshot, ssh)
from kvmrun import cli_net  # noqa: E402,F401  (registers net define/start/stop/list/status)
from kvmrun import cli_libvirt  # noqa: E402,F401  (registers convert; import/export use it)


# ---------------------------------------------------------------- entry point

GDB_VALUE = re.compile(r"(?:[\w.-]+:|\[[0-9a-fA-F:]+\]:)?\d+")


def optional_values(argv: list[str]) -> list[str]:
    """`--gdb` takes an optional value: `--gdb` alone (or before a non-port) means 1234."""
    fixed = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return fixed + argv[i:]
        if arg == "--gdb" and not (i + 1 < len(argv) and GDB_VALUE.fullmatch(argv[i + 1])):
            arg = "--gdb=1234"
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


def build_command(argv: list[str]):
    """The click command for this call, with only the verb it runs: typer builds every
    command's parameters from its signature, ~20 ms of each call for ~50 verbs. Without a
    known verb (--help, a typo) all of them, so typer lists them and suggests names."""
    verb = _verb(argv)
    commands = [c for c in app.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__)) == verb]
    groups = [g for g in app.registered_groups if g.name == verb]
    if not (commands or groups):
        return typer.main.get_command(app)
    saved = app.registered_commands, app.registered_groups
    app.registered_commands, app.registered_groups = commands, groups
    try:
        return typer.main.get_command(app)
    finally:
        app.registered_commands, app.registered_groups = saved


def main(argv: list[str] | None = None) -> None:
    from kvmrun import clifast
    clifast.install()                # plain values skip typer's pydantic (see clifast)
    argv = optional_values(sys.argv[1:] if argv is None else argv)
    command = build_command(argv)
    try:
        result = command.main(args=argv, prog_name="kvmrun", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        err("kvmrun: interrupted")
        code = 130
    except typer.TyperException as e:           # usage errors: bad flags, missing arguments
        e.show() if hasattr(e, "show") else err(f"kvmrun: error: {e.format_message()}")
        code = e.exit_code
    except KvmrunError as e:
        if _state["debug"]:
            import traceback
            traceback.print_exc()
        err(f"kvmrun: error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        err("kvmrun: interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: no tracebacks
        if _state["debug"]:
            import traceback
            traceback.print_exc()
        err(f"kvmrun: internal error: {type(e).__name__}: {e}\n"
            "  hint: run again with --debug for a traceback, and please report it")
        code = 1
    sys.stdout.flush()
    sys.exit(code)
