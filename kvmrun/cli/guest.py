"""Guest lifecycle verbs: start, run, stop, kill, status, list, console, logs, pause,
resume, reset, wait, qmp. Thin: each parses, calls kvmrun.control, prints."""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

import typer

from kvmrun.cli import _ONEOFF, SetOpt, _profile_from, app, emit_json, err, out

NameArg = typer.Argument(..., metavar="NAME", help="The guest's name.")


def _guest(name: str):
    from kvmrun.runtime import Guest
    from kvmrun.paths import NAME_RE          # not kvmrun.profile: no yaml for status, list…
    import re
    if not re.fullmatch(NAME_RE, name):
        from kvmrun.errors import GuestError
        raise GuestError(f"{name!r} is not a valid VM name")
    return Guest(name)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m
            else f"{s}s")


def _load(profile_ref, sets, name, oneoff):
    import dataclasses
    prof = _profile_from(profile_ref, sets, oneoff)
    return dataclasses.replace(prof, name=name) if name else prof


@app.command()
def start(
    profile_ref: Optional[str] = typer.Argument(None, metavar="PROFILE|NAME"),
    name: Optional[str] = typer.Option(None, "--name", help="Run under another name."),
    sets: Optional[List[str]] = SetOpt,
    wait_ready: bool = typer.Option(True, "--wait-ready/--no-wait-ready",
                                    help="Wait for the profile's ready.console pattern."),
    ephemeral: bool = typer.Option(False, "--ephemeral",
                                   help="Throwaway run: every writable disk gets an overlay "
                                        "that is deleted when the guest stops."),
    as_json: bool = typer.Option(False, "--json"),
    hda: Optional[str] = _ONEOFF["hda"], cdrom: Optional[str] = _ONEOFF["cdrom"],
    memory: Optional[str] = _ONEOFF["memory"], kernel: Optional[str] = _ONEOFF["kernel"],
    initrd: Optional[str] = _ONEOFF["initrd"], append: Optional[str] = _ONEOFF["append"],
    gdb: Optional[str] = _ONEOFF["gdb"], halted: bool = _ONEOFF["halted"],
) -> None:
    """Start a guest in the background under its own supervisor.

    Returns once QEMU's monitor answers (and, with `ready: {console: REGEX}` in the
    profile, once the serial console printed a match; not with --halted)."""
    from kvmrun import control
    prof = _load(profile_ref, sets, name, dict(hda=hda, cdrom=cdrom, memory=memory,
                                                kernel=kernel, initrd=initrd, append=append,
                                                gdb=gdb, halted=halted or None))
    if ephemeral:
        from kvmrun.storage import all_ephemeral
        prof = all_ephemeral(prof)
    result = control.start(prof, wait_ready=wait_ready, note=err)
    guest = _guest(prof.name)
    info = {**result, "console_log": str(guest.paths.serial_log),
            "console_socket": str(guest.paths.console), "qmp": str(guest.paths.qmp_cli),
            "run_dir": str(guest.paths.dir)}
    if as_json:
        emit_json(info)
        return
    out(f"started {prof.name} (pid {result.get('pid')})" + (", ready" if result.get("ready")
                                                            else ""))
    out(f"  console: kvmrun console {prof.name}   log: {info['console_log']}")
    out(f"  qmp:     {info['qmp']}")
    if prof.gdb:
        out(f"  gdb:     target remote {prof.gdb}")
    if prof.halted:
        out(f"  halted:  vCPUs stopped; `kvmrun resume {prof.name}` or gdb's continue starts them")


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
    kernel: Optional[str] = _ONEOFF["kernel"], initrd: Optional[str] = _ONEOFF["initrd"],
    append: Optional[str] = _ONEOFF["append"], memory: Optional[str] = _ONEOFF["memory"],
    gdb: Optional[str] = _ONEOFF["gdb"], halted: bool = _ONEOFF["halted"],
) -> None:
    """Run a guest in the foreground (for systemd, scripts and embedded work).

    Ctrl-C or SIGTERM stops the guest gracefully (then escalates). Exit code: 0 powered
    off or stopped gracefully, 7 QEMU failed to start, 8 crashed, 9 guest panicked,
    10 stop escalated, 11 killed."""
    from kvmrun import control
    prof = _load(profile_ref, sets, name, dict(kernel=kernel, initrd=initrd, append=append,
                                                memory=memory, gdb=gdb, halted=halted or None))
    if not rm:
        raise typer.Exit(control.run_foreground(prof, note=err, console=console))
    from kvmrun.storage import all_ephemeral
    try:
        code = control.run_foreground(all_ephemeral(prof), note=err, console=console)
    finally:
        guest = _guest(prof.name)
        if guest.qemu_pid() is None:
            guest.remove_dir()
    raise typer.Exit(code)


def _progress():
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def show(stage: str, message: str) -> None:
        line = f"[{time.monotonic() - started:5.1f}s] {message}"
        if tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    return show, tty


@app.command()
def stop(
    name: str = NameArg,
    timeout: Optional[float] = typer.Option(None, "--timeout", metavar="SECONDS",
                                            help="Graceful wait (default: the profile's "
                                                 "shutdown.timeout)."),
    force: bool = typer.Option(False, "--force", help="After the timeout: QMP quit, then "
                                                      "SIGTERM, then SIGKILL."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Shut a guest down gracefully (ACPI power button, re-sent while it boots).

    On timeout without --force the guest is left running and the exit code is 5."""
    from kvmrun import control
    show, tty = _progress()
    try:
        result = control.stop(_guest(name), timeout, force, progress=show)
    finally:
        if tty:
            sys.stderr.write("\n")
    if as_json:
        emit_json(result)
    else:
        how = {"acpi": "the guest powered off", "agent": "the guest agent powered it off",
               "console": "the guest powered off from its console",
               "already-exited": "it had already exited"}.get(
                   result["stage"], f"ended by {result['stage']}")
        out(f"stopped {name}: {how} (shutdown method {result.get('method') or 'acpi'})")


@app.command("kill")
def kill_cmd(name: str = NameArg) -> None:
    """Power a guest off hard, now (QMP quit; SIGKILL if QMP is gone). Aliases: poweroff,
    destroy."""
    from kvmrun import control
    result = control.kill(_guest(name))
    out(f"killed {name} ({result['stage']})")


app.command("poweroff", help="Alias of kill.")(kill_cmd)
app.command("destroy", help="Alias of kill.")(kill_cmd)


def _ended_text(ended: dict | None) -> str:
    if not ended:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended["at"])) if ended.get(
        "at") else "unknown time"
    return f"{ended.get('detail', ended.get('reason'))} (at {when})"


@app.command()
def status(name: str = NameArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """State, resources, disks, forwards and paths of a guest; for a stopped guest, how
    and when it ended."""
    from kvmrun import control
    info = control.status(_guest(name))
    if as_json:
        emit_json(info)
        return
    rows = [("state", info["state"]), ("pid", info["pid"] or "-"),
            ("uptime", _duration(info["uptime"])),
            ("arch", f"{info['arch']}  machine {info['machine']}  accel {info['accel']}"),
            ("vcpus", info["vcpus"]), ("memory", f"{info['memory_mib']} MiB")]
    for disk in info.get("disks", []):
        rows.append(("disk", f"{disk['device']}: {disk['file']} ({disk['format']}"
                             f"{', ro' if disk['readonly'] else ''})"))
    for fwd in info["forwards"]:
        rows.append(("forward", fwd))
    for nic in info.get("nics", []):
        where = {"user": "user network", "bridge": f"bridge {nic.get('bridge')}"}.get(
            nic["type"], f"{nic['type']} network {nic.get('network')}")
        lease = nic.get("lease")
        rows.append(("nic", f"net{nic['index']}: {nic['mac']} on {where}"
                            + (f" (tap {nic['tap']})" if nic.get("tap") else "")
                            + (f", lease {lease['ip']}" if lease else "")))
    for i in info.get("ephemeral_disks", []):
        rows.append(("overlay", f"disk{i} is ephemeral: its writes go to a throwaway overlay"))
    for share in info.get("shares", []):
        rows.append(("share", f"{share['path']} as {share['tag']}"
                              f"{' (ro)' if share['readonly'] else ''}; in the guest: "
                              f"{share['mount']}"))
    if "cpu_percent" in info:
        rows.append(("host", f"cpu {info['cpu_percent']}% (average since start)  "
                             f"rss {info['rss_mib']} MiB"))
    rows.append(("shutdown", info["shutdown_method"]))
    if info["pid"]:                         # sockets exist only while the guest runs
        rows += [("console", info["console"]), ("qmp", info["qmp"])]
    rows.append(("log", info["serial_log"]))
    if info["ended"]:
        rows.append(("ended", _ended_text(info["ended"])))
    out(f"{info['name']}")
    for key, value in rows:
        out(f"  {key:<9}{value}")


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json"),
    all_: bool = typer.Option(False, "--all", help="Also defined VMs that are not running."),
    defined: bool = typer.Option(False, "--defined", help="Only defined VMs."),
) -> None:
    """One line per guest: state, PID, memory, vCPUs, uptime."""
    from kvmrun import control
    rows = [] if defined else control.list_guests()
    if all_ or defined:
        try:
            from kvmrun import store
            known = {r["name"] for r in rows}
            for vm in store.list_defined():
                if vm.name not in known:
                    rows.append({"name": vm.name, "state": "defined", "pid": None,
                                 "memory_mib": vm.memory, "vcpus": vm.smp, "uptime": None,
                                 "ended": None})
        except AttributeError:
            pass
    if as_json:
        emit_json(rows)
        return
    units = any(r.get("unit") for r in rows)
    out(f"{'NAME':<20} {'STATE':<14} {'PID':>7} {'MEMORY':>8} {'VCPUS':>5}  {'UPTIME':<8}"
        + ("  UNIT" if units else ""))
    for r in rows:
        out(f"{r['name']:<20} {r['state']:<14} {r['pid'] or '-':>7} "
            f"{str(r['memory_mib'] or '-') + 'M':>8} {r['vcpus'] or '-':>5}  "
            f"{_duration(r['uptime']):<8}" + (f"  {r.get('unit') or '-'}" if units else ""))


@app.command()
def console(name: str = NameArg) -> None:
    """Attach to a guest's serial console. Ctrl-] detaches."""
    from kvmrun import console as con, runtime
    guest = _guest(name)
    runtime.require_running(guest)
    err(f"connected to {name}'s console; Ctrl-] detaches")
    how = con.relay(guest.paths.console)
    err(f"\r\n{ {'detached': 'detached', 'eof': 'input ended', 'closed': 'the guest closed the console'}[how] }")


@app.command()
def logs(
    name: str = NameArg,
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output."),
    lines: Optional[int] = typer.Option(None, "-n", "--lines", help="Only the last N lines."),
) -> None:
    """Print a guest's serial console log."""
    guest = _guest(name)
    path = guest.paths.serial_log
    if not path.exists():
        from kvmrun.errors import GuestError
        raise GuestError(f"no console log for {name} at {path}")
    with open(path, "rb") as f:
        data = f.read()
        if lines is not None:
            # like tail -n: an unfinished last line (a shell prompt) counts as a line
            keep = lines + 1 if data.endswith(b"\n") else lines
            data = b"\n".join(data.split(b"\n")[-keep:]) if lines else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while follow:
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif guest.qemu_pid() is None:
                break
            else:
                time.sleep(0.2)


@app.command()
def pause(name: str = NameArg) -> None:
    """Pause a guest's vCPUs."""
    from kvmrun import control
    control.pause(_guest(name))
    out(f"paused {name}")


@app.command()
def resume(name: str = NameArg) -> None:
    """Resume a paused (or --halted) guest."""
    from kvmrun import control
    control.resume(_guest(name))
    out(f"resumed {name}")


@app.command()
def reset(name: str = NameArg) -> None:
    """Hard-reset a guest (like the reset button)."""
    from kvmrun import control
    control.reset(_guest(name))
    out(f"reset {name}")


@app.command()
def wait(
    name: str = NameArg,
    for_: str = typer.Option(..., "--for", metavar="running|stopped|ready"),
    timeout: float = typer.Option(300, "--timeout", metavar="SECONDS"),
) -> None:
    """Wait until a guest is running, ready or stopped (exit code 5 on timeout)."""
    from kvmrun import control
    if for_ not in ("running", "stopped", "ready"):
        from kvmrun.errors import KvmrunError
        raise KvmrunError(f"--for {for_!r}: expected running, stopped or ready")
    control.wait_for(_guest(name), for_, timeout)
    out(f"{name} {for_}")


@app.command()
def qmp(
    name: str = NameArg,
    command: str = typer.Argument(..., help="QMP command, e.g. query-status."),
    arguments: Optional[str] = typer.Argument(None, metavar="[JSON-ARGS]",
                                              help="Arguments as a JSON object."),
) -> None:
    """Run a raw QMP command on a guest and print the result as JSON."""
    from kvmrun import control
    from kvmrun.errors import KvmrunError
    args = None
    if arguments:
        try:
            args = json.loads(arguments)
        except ValueError as e:
            raise KvmrunError(f"JSON-ARGS is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise KvmrunError("JSON-ARGS must be a JSON object")
    emit_json(control.qmp_command(_guest(name), command, args))
