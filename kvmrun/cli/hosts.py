"""`-H/--host`: a verb run on another host through ssh (the work is in kvmrun.ops.remote).

kvmrun.cli.entry takes every -H out of the command line before typer sees it and hands the
rest here: one host runs the verb there, exit code, stdout and stderr unchanged; `list` with
several hosts merges their `list --json` into one table with a HOST column; a verb whose
PROFILE argument is a local file (`start -H host ./web.yaml`) sends that profile first.
No verbs of its own (so it is not in entry.MODULES).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from kvmrun.cli.app import emit_json, err, out
from kvmrun.errors import KvmrunError, UsageError
from kvmrun.ops import remote

PROFILE_VERBS = {"start", "run", "define", "validate", "cmdline"}


def dispatch(hosts: list[remote.Host], argv: list[str], verb: str | None, build) -> int:
    """Run `kvmrun ARGV` on `hosts`; `build(argv)` is entry.build_command."""
    if verb == "list" and len(hosts) > 1:
        return list_many(hosts, argv)
    if len(hosts) > 1:
        raise UsageError(f"`{verb or 'kvmrun'}` runs on one host; only `list` takes several "
                         "--host")
    host = hosts[0]
    # on a terminal every verb gets one there (ssh -t), so Ctrl-C reaches the remote kvmrun
    # (a `migrate` there rolls back) and interactive verbs work; never when piped
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if verb in PROFILE_VERBS:
        index = _profile_index(argv, verb, build)
        local = remote.local_profile(argv[index]) if index is not None else None
        if local is not None:
            return _with_profile(host, argv, index, local, tty)
    return remote.call(host, argv, tty=tty)


def _with_profile(host, argv: list[str], index: int, local, tty: bool) -> int:
    there, directory = remote.send_profile(host, local)
    try:
        return remote.call(host, [*argv[:index], there, *argv[index + 1:]], tty=tty)
    finally:
        remote.remove_dir(host, directory)


def _profile_index(argv: list[str], verb: str, build) -> int | None:
    """Where in `argv` the verb's first argument (its PROFILE) is, skipping option values
    (known from the verb's own click command)."""
    command = build(argv).commands.get(verb)
    if command is None:
        return None
    valued = {opt for p in command.params
              if p.param_type_name == "option" and not getattr(p, "is_flag", False)
              and not getattr(p, "count", False) for opt in (*p.opts, *p.secondary_opts)}
    i = argv.index(verb) + 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else None
        if arg in valued:
            i += 2
            continue
        if not arg.startswith("-") or arg == "-":
            return i
        i += 1
    return None


def list_many(hosts: list[remote.Host], argv: list[str]) -> int:
    """`list -H a -H b`: every host's guests in one table (HOST column; `--json` adds
    "host"). A host that cannot be asked gets its error line; the others are still shown
    and the exit code is the first failure's."""
    as_json = "--json" in argv
    ask = [a for a in argv if a != "--json"] + ["--json"]

    def one(host):
        try:
            code, out, errors = remote.capture(host, ask)
        except KvmrunError as e:
            return host, e.exit_code, [], str(e)
        if code != 0:
            return host, code, [], errors.strip()
        try:
            rows = json.loads(out)
        except ValueError:
            return host, 1, [], f"{host}: `kvmrun list --json` printed no JSON"
        return host, 0, [{"host": str(host), **row} for row in rows], ""

    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        results = list(pool.map(one, hosts))
    rows, code = [], 0
    for host, status, found, message in results:
        rows += found
        if status:
            err(message if message.startswith("kvmrun:") else f"kvmrun: error: {message}")
            code = code or status
    if as_json:
        emit_json(rows)
    else:
        from kvmrun.cli.views import list_lines
        for line in list_lines(rows, hosts=True):
            out(line)
    return code
