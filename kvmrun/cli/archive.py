"""The CLI half of `export --with-disks` and `import ARCHIVE`: output targets, progress on a
terminal, the summary. No verbs of its own: kvmrun.cli.defined's export/import call it (the
work is in kvmrun.ops.archive and kvmrun.ops.unpack)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kvmrun.cli.app import emit_json, err, lazy, out
import typer

from kvmrun.errors import ProfileError, UsageError

archive = lazy("kvmrun.ops.archive")
unpack = lazy("kvmrun.ops.unpack")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def progress(label: str):
    """A callback drawing `label  done / total  rate  ETA` on stderr when it is a terminal
    (at most 4 times a second); silent otherwise."""
    if not sys.stderr.isatty():
        return lambda done, total: None
    start, last = time.monotonic(), [0.0]

    def draw(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.25 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-3)
        eta = (total - done) / rate if rate > 0 else 0
        sys.stderr.write(f"\r{label}  {_mib(done)} / {_mib(total)}  {_mib(rate)}/s  "
                         f"ETA {int(eta) // 60}:{int(eta) % 60:02d}\033[K")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return draw


def export(profile, output: str | None, to: str | None, flatten: bool, live: bool,
           as_json: bool) -> None:
    """`kvmrun export NAME --with-disks (-o FILE|- | --to HOST)`."""
    if to:
        from kvmrun.ops.remote import parse_host
        summary = archive.export_to(parse_host(to), profile, flatten=flatten, live=live,
                                    progress=progress(f"export {profile.name} to {to}"))
        where = f"{to} ({summary['imported'].get('path', '?')})"
    elif not output:
        raise UsageError("--with-disks needs -o FILE, -o - (stdout) or --to HOST")
    elif output == "-":
        if sys.stdout.isatty():
            raise UsageError("the archive is binary: not written to a terminal",
                             hint="-o FILE, or pipe it: kvmrun export NAME --with-disks -o - "
                                  "| ssh host kvmrun import -")
        sys.stdout.flush()
        summary = archive.export(profile, sys.stdout.buffer, flatten=flatten, live=live,
                                 progress=progress(f"export {profile.name}"))
        return
    else:
        summary, where = _to_file(profile, Path(output).absolute(), flatten, live)
    if as_json:
        emit_json(summary)
    else:
        out(f"exported {profile.name} with {len(summary['files'])} file(s) to {where}")


def _to_file(profile, target: Path, flatten: bool, live: bool):
    if target.exists():
        raise UsageError(f"{target} already exists; not overwritten")
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            summary = archive.export(profile, f, flatten=flatten, live=live,
                                     progress=progress(f"export {profile.name}"))
            os.fsync(f.fileno())
        os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return summary, target


def is_archive(path: str) -> bool:
    return unpack.is_archive(path)


def import_(source: str, name, pool, directory, no_check_files: bool, as_json: bool) -> None:
    try:
        result = unpack.import_archive(source, name=name, pool=pool, directory=directory,
                                       check_files=not no_check_files,
                                       progress=progress(f"import {name or ''}".strip()))
    except ProfileError as e:
        err(f"kvmrun: error: {e}")
        err("  hint: nothing was imported; make those files exist here (the paths are "
            "the exporting host's), or --no-check-files and fix them with `kvmrun edit`")
        raise typer.Exit(e.exit_code) from None
    for w in result["warnings"]:
        err(f"kvmrun: warning: {w}")
    if as_json:
        emit_json(result)
    else:
        out(f"imported {result['name']} ({result['path']}) with its disks: "
            + ", ".join(result["disks"]))
