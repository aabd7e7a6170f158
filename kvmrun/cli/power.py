"""Verbs on a running guest: stop, kill (poweroff, destroy), pause, resume, reset, wait,
qmp, console, logs."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import typer

from kvmrun.cli.app import NameArg, app, emit_json, err, guest, json_object, out
from kvmrun.cli.text import progress, stopped
from kvmrun.errors import GuestError
from kvmrun.guest.rundir import require_running
from kvmrun.ops import power, systemd


@app.command()
def stop(
    names: list[str] = typer.Argument(..., metavar="NAME", help="The guests' names."),
    timeout: Optional[float] = typer.Option(None, "--timeout", metavar="SECONDS",
                                            help="Graceful wait (default: the profile's "
                                                 "shutdown.timeout)."),
    force: bool = typer.Option(False, "--force", help="After the timeout: QMP quit, then "
                                                      "SIGTERM, then SIGKILL."),
    as_json: bool = typer.Option(False, "--json"),
    no_unit: bool = typer.Option(False, "--no-unit",
                                 help="Stop it here even when its kvmrun@NAME unit runs it."),
) -> None:
    """Shut guests down gracefully (ACPI power button, re-sent while it boots).

    On timeout without --force the guest is left running and the exit code is 5. A guest
    whose kvmrun@NAME unit is enabled or runs it stops through `systemctl stop` (which
    always escalates after the profile's timeout; --no-unit: here). Several names are
    stopped at once, in one process, each with its own timeout and escalation: a line (or
    with --json a list entry) per guest, in the order given; the exit code is that of the
    first guest that failed."""
    if len(names) > 1:
        raise typer.Exit(_stop_many(names, timeout, force, as_json, no_unit))
    with progress() as show:
        result, line = _stop_one(names[0], timeout, force, no_unit, show)
    emit_json(result) if as_json else out(line)


def _stop_one(name: str, timeout: float | None, force: bool, no_unit: bool,
              show) -> tuple[dict, str]:
    """Stop one guest: (its result, the line that says so)."""
    target = guest(name)
    if not no_unit:
        unit = systemd.unit_for(name, (target.read_state() or {}).get("unit"))
        if unit:
            systemd.refuse_options(unit, ["--timeout"] if timeout is not None else [])
            return _stop_unit(target, unit)
    result = power.stop(target, timeout, force, progress=show)
    return result, stopped(name, result)


def _stop_many(names: list[str], timeout: float | None, force: bool, as_json: bool,
               no_unit: bool) -> int:
    """`kvmrun stop A B C`: each guest in a thread of its own (their waits are on pidfds
    and sockets), so N guests cost one interpreter, not N."""
    import threading                      # here: a stop of one guest runs no thread

    from kvmrun.errors import KvmrunError
    started = time.monotonic()
    outcome: dict[str, tuple] = {}

    def one(name: str) -> None:
        def show(stage: str, message: str) -> None:
            err(f"{name}: [{time.monotonic() - started:5.1f}s] {message}")
        try:
            outcome[name] = _stop_one(name, timeout, force, no_unit, show)
        except KvmrunError as e:
            outcome[name] = ({"name": name, "error": str(e), "exit_code": e.exit_code},
                             None)
        except Exception as e:  # noqa: BLE001 - reported with the others, no traceback
            outcome[name] = ({"name": name, "error": f"{type(e).__name__}: {e}",
                              "exit_code": 1}, None)
    todo = list(dict.fromkeys(names))     # a name given twice is stopped once
    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in todo]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)                   # (a bare join would not see Ctrl-C)
    code = 0
    for name in todo:
        result, line = outcome[name]
        if line is None:
            code = code or result["exit_code"]
            err(f"kvmrun: error: {name}: {result['error']}")
        elif not as_json:
            out(line)
    if as_json:
        emit_json([outcome[n][0] for n in todo])
    return code


def _stop_unit(target, unit: str) -> tuple[dict, str]:
    require_running(target)                  # as a direct stop: exit 4 when it is not
    systemd.stop_unit(unit)
    ended = (target.read_state() or {}).get("ended") or {}
    stage = ended.get("stage")
    result = {"name": target.name, "unit": unit, "via": "systemctl", "stage": stage,
              "state": str(target.live_state()[0]), "reason": ended.get("reason")}
    return result, f"stopped {target.name} through {unit}" + (f" ({stage})" if stage else "")


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
