"""Verbs on a running guest: stop, kill (poweroff, destroy), pause, resume, reset, wait,
qmp, console, logs."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import typer

from kvmrun.cli.app import NameArg, app, emit_json, err, guest, json_object, out
from kvmrun.errors import GuestError
from kvmrun.guest.rundir import require_running
from kvmrun.ops import power, systemd


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
    no_unit: bool = typer.Option(False, "--no-unit",
                                 help="Stop it here even when its kvmrun@NAME unit runs it."),
) -> None:
    """Shut a guest down gracefully (ACPI power button, re-sent while it boots).

    On timeout without --force the guest is left running and the exit code is 5. A guest
    whose kvmrun@NAME unit is enabled or runs it stops through `systemctl stop` (which
    always escalates after the profile's timeout; --no-unit: here)."""
    target = guest(name)
    if not no_unit:
        unit = systemd.unit_for(name, (target.read_state() or {}).get("unit"))
        if unit:
            systemd.refuse_options(unit, ["--timeout"] if timeout is not None else [])
            _stop_unit(target, unit, as_json)
            return
    show, tty = _progress()
    try:
        result = power.stop(target, timeout, force, progress=show)
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


def _stop_unit(target, unit: str, as_json: bool) -> None:
    require_running(target)                  # as a direct stop: exit 4 when it is not
    systemd.stop_unit(unit)
    ended = (target.read_state() or {}).get("ended") or {}
    stage = ended.get("stage")
    result = {"name": target.name, "unit": unit, "via": "systemctl", "stage": stage,
              "state": str(target.live_state()[0]), "reason": ended.get("reason")}
    if as_json:
        emit_json(result)
    else:
        out(f"stopped {target.name} through {unit}" +
            (f" ({stage})" if stage else ""))


@app.command("kill")
def kill_cmd(name: str = NameArg) -> None:
    """Power a guest off hard, now (QMP quit; SIGKILL if QMP is gone). Aliases: poweroff,
    destroy."""
    result = power.kill(guest(name))
    out(f"killed {name} ({result['stage']})")


app.command("poweroff", help="Alias of kill.")(kill_cmd)
app.command("destroy", help="Alias of kill.")(kill_cmd)




@app.command()
def console(name: str = NameArg) -> None:
    """Attach to a guest's serial console. Ctrl-] detaches."""
    from kvmrun.guest import console as con      # termios, tty: only this verb needs them
    target = guest(name)
    require_running(target)
    err(f"connected to {name}'s console; Ctrl-] detaches")
    how = con.relay(target.paths.console)
    err(f"\r\n{ {'detached': 'detached', 'eof': 'input ended', 'closed': 'the guest closed the console'}[how] }")


@app.command()
def logs(
    name: str = NameArg,
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output."),
    lines: Optional[int] = typer.Option(None, "-n", "--lines", help="Only the last N lines."),
) -> None:
    """Print a guest's serial console log."""
    target = guest(name)
    path = target.paths.serial_log
    if not path.exists():
        raise GuestError(f"no console log for {name} at {path}")
    with open(path, "rb") as f:
        data = tail(f, lines) if lines is not None else f.read()
        f.seek(0, os.SEEK_END)
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while follow:
            if os.fstat(f.fileno()).st_size < f.tell():
                f.seek(0)                         # rotated (truncated) under us
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif target.qemu_pid() is None:
                break
            else:
                time.sleep(0.2)


def tail(f, lines: int, block: int = 65536) -> bytes:
    """The last `lines` lines of an open file, read backwards from its end in blocks (a
    huge log costs only what is printed). Like tail -n, an unfinished last line (a shell
    prompt) counts as a line."""
    if lines <= 0:
        return b""
    end = f.seek(0, os.SEEK_END)
    data, pos = b"", end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
        want = lines + 1 if data.endswith(b"\n") else lines
        if data.count(b"\n") >= want:
            break
    keep = lines + 1 if data.endswith(b"\n") else lines
    return b"\n".join(data.split(b"\n")[-keep:])


@app.command()
def pause(name: str = NameArg) -> None:
    """Pause a guest's vCPUs."""
    power.pause(guest(name))
    out(f"paused {name}")


@app.command()
def resume(name: str = NameArg) -> None:
    """Resume a paused (or --halted) guest."""
    power.resume(guest(name))
    out(f"resumed {name}")


@app.command()
def reset(name: str = NameArg) -> None:
    """Hard-reset a guest (like the reset button)."""
    power.reset(guest(name))
    out(f"reset {name}")


@app.command()
def wait(
    name: str = NameArg,
    for_: str = typer.Option(..., "--for", metavar="running|stopped|ready"),
    timeout: float = typer.Option(300, "--timeout", metavar="SECONDS"),
) -> None:
    """Wait until a guest is running, ready or stopped (exit code 5 on timeout)."""
    power.wait_for(guest(name), for_, timeout)
    out(f"{name} {for_}")


@app.command()
def qmp(
    name: str = NameArg,
    command: str = typer.Argument(..., help="QMP command, e.g. query-status."),
    arguments: Optional[str] = typer.Argument(None, metavar="[JSON-ARGS]",
                                              help="Arguments as a JSON object."),
) -> None:
    """Run a raw QMP command on a guest and print the result as JSON."""
    emit_json(power.qmp_command(guest(name), command, json_object(arguments)))
