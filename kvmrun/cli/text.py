"""Text the CLI prints that more than one entry point shares (no typer here: the quick
start path prints it too)."""

from __future__ import annotations

import contextlib
import errno
import sys
import time

from kvmrun.errors import KvmrunError
from kvmrun.paths import RunPaths
from kvmrun.proc import debug


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


STOPPED = {"acpi": "the guest powered off", "agent": "the guest agent powered it off",
           "console": "the guest powered off from its console",
           "already-exited": "it had already exited"}


def stopped(name: str, result: dict) -> str:
    """What `kvmrun stop NAME` prints once the guest is gone."""
    how = STOPPED.get(result["stage"], f"ended by {result['stage']}")
    return f"stopped {name}: {how} (shutdown method {result.get('method') or 'acpi'})"


@contextlib.contextmanager
def progress():
    """`with progress() as show:` a long wait's steps on stderr, rewritten in place on a
    terminal (whose line is ended when the wait is over, however it ends)."""
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def show(stage: str, message: str) -> None:
        line = f"[{time.monotonic() - started:5.1f}s] {message}"
        if tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    try:
        yield show
    finally:
        if tty:
            sys.stderr.write("\n")


PLAIN_ERRNOS = {errno.ENOSPC: "free some space, or move it with KVMRUN_RUN_DIR / "
                              "KVMRUN_DATA_DIR",
                errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is mounted read-only",
                errno.EACCES: "check the owner and mode of the file and its directories",
                errno.EPERM: "check the owner and mode of the file and its directories",
                errno.ENAMETOOLONG: "use a shorter path",
                errno.EMFILE: "too many open files (ulimit -n)"}


def plain_oserror(e: OSError) -> str:
    """An OS error as a user reads it: what failed on which file, and what to do (a full
    disk, a read-only file system, a permission, a long name are not internal errors)."""
    where = f"{e.filename}: " if e.filename else ""
    where = where if len(where) <= 120 else where[:100] + "…: "
    text = f"{where}{e.strerror or e}"
    hint = PLAIN_ERRNOS.get(e.errno)
    return text + (f"\n  hint: {hint}" if hint else "")


def failure(e: BaseException) -> int:
    """Say on stderr what ended a call, as every entry point does (the typer CLI and the
    paths served before it); the exit code. A traceback only with --debug/KVMRUN_DEBUG."""
    if isinstance(e, KeyboardInterrupt):
        sys.stderr.write("kvmrun: interrupted\n")
        return 130
    if isinstance(e, BrokenPipeError):
        return 0
    if debug():
        import traceback
        traceback.print_exception(e)
    if isinstance(e, KvmrunError):
        sys.stderr.write(f"kvmrun: error: {e}\n")
        return e.exit_code
    if isinstance(e, OSError):
        sys.stderr.write(f"kvmrun: error: {plain_oserror(e)}\n")
        return 1
    sys.stderr.write(f"kvmrun: internal error: {type(e).__name__}: {e}\n"
                     "  hint: run again with --debug for a traceback, and please report it\n")
    return 1
