"""The `kvmrun` console script. Served here, before typer (~0.1 s of CPU a call) is imported:
a plain `kvmrun start PROFILE` (for a profile unchanged since its last start, without yaml
or the compiler either: kvmrun.ops.quickstart), a plain `kvmrun stop NAME` of a guest no
systemd unit runs, `kvmrun status NAME [--json]` and `kvmrun list [--json]`, and
`kvmrun migrate-target STEP`, a live migration's steps on its target. Any other option,
another host ($KVMRUN_HOST) or anything else goes to the full CLI (kvmrun.cli.entry).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """As the console script (no `argv`), the process ends with os._exit once its output is
    flushed: the interpreter's tear-down (freeing every module and object) cost `kvmrun
    stop` and `status` ~30 ms of CPU after their work was done. Nothing of kvmrun's needs
    it: files are written with `with`, and nothing registers atexit handlers."""
    if argv is not None:
        return _main(list(argv))
    try:
        _main(sys.argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):          # a closed or broken pipe: nothing more to say
        pass
    os._exit(code or 0)


def _main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "migrate-target":
        sys.exit(_migrate_target(argv[1]))
    code = None if os.environ.get("KVMRUN_HOST") else _served(argv)   # -H: the full CLI
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)
    from kvmrun.cli.entry import main as full
    full(argv)


def _served(argv: list[str]) -> int | None:
    """The exit code of a call served here, or None when the full CLI must take it."""
    verb, rest = (argv[0], argv[1:]) if argv else ("", [])
    if verb in ("start", "stop"):
        if len(rest) != 1 or rest[0].startswith("-"):
            return None
        for serve in (_quick_start, _plain_start) if verb == "start" else (_quick_stop,):
            code = serve(rest[0])
            if code is not None:
                return code
        return None
    words = [arg for arg in rest if arg != "--json"]
    if len(rest) - len(words) > 1 or any(arg.startswith("-") for arg in words):
        return None
    if verb == "status" and len(words) == 1:
        return _look(words[0], as_json=len(words) < len(rest))
    if verb == "list" and not words:
        return _look(None, as_json=bool(rest))
    return None


def _migrate_target(step: str) -> int:
    """The target's half of a live migration (kvmrun.ops.migrate_target), run there by the
    source over ssh: JSON in and out, no typer (its import was on the migration's path)."""
    from kvmrun.errors import KvmrunError
    from kvmrun.ops import migrate_target
    try:
        migrate_target.serve(step)
    except KvmrunError as e:
        sys.stderr.write(f"kvmrun: error: {e}\n")
        return e.exit_code
    return 0


def _quick_start(ref: str) -> int | None:
    """The exit code of a quick start, or None when the full path must run."""
    from kvmrun.cli.text import failure
    from kvmrun.ops import quickstart

    def err(text: str) -> None:
        sys.stderr.write(text + "\n")
    try:
        done = quickstart.start(ref, note=err)
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - as the full CLI: no traceback
        return failure(e)
    if done is None:
        return None
    result, entry = done
    _say_started(result, entry.get("gdb"), bool(entry.get("halted")))
    return 0


def _plain_start(ref: str) -> int | None:
    """`kvmrun start PROFILE` with no cached launch (a new profile, or one changed since its
    last start), as the full CLI does it (kvmrun.cli.launch) but without typer (~60 ms), or
    None when the guest's kvmrun@NAME unit must start it (systemctl: the full CLI)."""
    from kvmrun.cli.text import failure
    try:
        from kvmrun.ops import launch, profiles, systemd
        if systemd.unit_for(ref):
            return None
        profile = profiles.load_profile(ref)
        result = launch.start(profile, wait_ready=True,
                              note=lambda text: sys.stderr.write(text + "\n"))
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - as the full CLI: no traceback
        return failure(e)
    _say_started(result, profile.gdb, profile.halted)
    return 0


def _look(name: str | None, as_json: bool) -> int:
    """`kvmrun status NAME [--json]` (`name`) or `kvmrun list [--json]`, as the full CLI
    prints them (kvmrun.cli.inspect): what scripts poll, without typer's ~60 ms."""
    from kvmrun.cli.text import failure
    try:
        from kvmrun.cli import views
        from kvmrun.ops import inspect
        if name is None:
            info = inspect.list_guests()
            lines = [views.json_text(info)] if as_json else views.list_lines(info)
        else:
            from kvmrun.guest.rundir import Guest
            from kvmrun.paths import check_name
            info = inspect.status(Guest(check_name(name)))
            lines = [views.json_text(info)] if as_json else views.status_lines(info)
        for line in lines:
            sys.stdout.write(line + "\n")
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - as the full CLI: no traceback
        return failure(e)
    return 0


def _say_started(result: dict, gdb: str | None, halted: bool) -> None:
    from kvmrun.cli.text import gdb_warning, started
    from kvmrun.guest.rundir import Guest
    for line in started(result["name"], result, Guest(result["name"]).paths, gdb, halted):
        sys.stdout.write(line + "\n")
    if gdb_warning(gdb):
        sys.stderr.write(gdb_warning(gdb) + "\n")


def _quick_stop(name: str) -> int | None:
    """`kvmrun stop NAME` as the full CLI does it (kvmrun.cli.power), or None when the
    guest's kvmrun@NAME unit must stop it (systemctl: the full CLI)."""
    from kvmrun.cli.text import failure, progress, stopped
    try:
        from kvmrun.guest.rundir import Guest
        from kvmrun.ops import power, systemd
        from kvmrun.paths import check_name
        target = Guest(check_name(name))
        if systemd.unit_for(name, (target.read_state() or {}).get("unit")):
            return None
        with progress() as show:
            result = power.stop(target, progress=show)
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - as the full CLI: no traceback
        return failure(e)
    sys.stdout.write(stopped(name, result) + "\n")
    return 0
