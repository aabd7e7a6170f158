"""libvirt domain XML on the command line: `kvmrun convert FILE.xml`, and the helpers that
`kvmrun import FILE.xml` and `kvmrun export NAME --format libvirt` use (kvmrun.cli_store)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from kvmrun.cli import app, emit_json, err
from kvmrun.errors import Location, ProfileError

Lossy = typer.Option(False, "--lossy", help="Convert even though some settings have no kvmrun "
                                            "counterpart (each is listed, and named in the "
                                            "profile's comment block).")


class LostSettings(ProfileError):
    """The domain uses settings kvmrun cannot express, and --lossy was not given (exit 2)."""

    def __init__(self, source: str, problems):
        lines = "\n".join(f"  {source}:{f.line}: {f}" if f.line else f"  {f}" for f in problems)
        super().__init__(Location(source), f"{len(problems)} setting(s) of this domain have no "
                                           f"kvmrun counterpart:\n{lines}",
                         hint="--lossy converts it anyway, without them")
        self.problems = problems


def is_domain_xml(path: str) -> bool:
    """Whether a file looks like XML (the first non-blank byte is '<'); YAML profiles never
    start so."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def read_domain(path: str, name: str | None, lossy: bool, check_files: bool):
    """(profile, conversion) of a domain XML file; ProfileError for anything wrong."""
    from kvmrun.libvirt._xml import MAX_BYTES
    from kvmrun.libvirt.domain import convert
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(Location(path), "file not found") from None
    except OSError as e:
        raise ProfileError(Location(path), f"cannot read: {e.strerror or e}") from None
    conv = convert(raw, path)
    if name:
        conv.data["name"] = name
    problems = conv.problems(check_files)
    if problems and not lossy:
        raise LostSettings(path, problems)
    return conv.profile(), conv


def comment_block(conv, check_files: bool = True) -> str:
    lines = [f"# converted from {conv.source} by kvmrun"]
    if conv.notes:
        lines.append("# approximated:")
        lines += [f"#   {f}" for f in conv.notes]
    problems = conv.problems(check_files)
    if problems:
        lines.append("# not converted (--lossy):")
        lines += [f"#   {f}" for f in problems]
    return "\n".join(lines) + "\n"


def profile_text(prof, conv, check_files: bool = True) -> str:
    from kvmrun import store
    return comment_block(conv, check_files) + store.export_text(prof)


def annotate(path: Path, conv, check_files: bool = True) -> None:
    """Put the comment block (what was approximated or lost) above a defined VM's profile."""
    from kvmrun import store
    store.atomic_write(path, comment_block(conv, check_files) + path.read_text(encoding="utf-8"))


def copy_nvram(source: str, name: str) -> Path:
    """Copy a domain's UEFI variable store into kvmrun's (the original is left alone)."""
    from kvmrun.errors import KvmrunError
    from kvmrun.paths import nvram_path
    target = nvram_path(name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise KvmrunError(f"cannot copy the UEFI variables {source} to {target}: "
                          f"{e.strerror or e}") from None
    return target


@app.command()
def convert(
    xml_file: str = typer.Argument(..., metavar="FILE.xml",
                                   help="A libvirt domain definition (virsh dumpxml NAME)."),
    name: Optional[str] = typer.Option(None, "--name", help="Give the VM this name."),
    lossy: bool = Lossy,
    no_check_files: bool = typer.Option(False, "--no-check-files",
                                        help="Do not list disk, ISO and kernel paths that do "
                                             "not exist here."),
    as_json: bool = typer.Option(False, "--json", help="JSON: the profile, the losses and "
                                                       "the approximations."),
) -> None:
    """Print the kvmrun profile of a libvirt domain XML, for review (defines nothing).

    Every setting kvmrun has no counterpart for is listed with its XML path and line
    (`devices/hostdev[0]: PCI/USB passthrough is not supported`); then the conversion stops
    (exit 2) unless --lossy. What was approximated (a pty console becomes kvmrun's console
    socket, VNC listens on a unix socket …) is named in a comment block above the YAML.
    `kvmrun import FILE.xml` converts and defines in one step.
    """
    from kvmrun import store
    prof, conv = read_domain(xml_file, name, lossy, not no_check_files)
    if as_json:
        emit_json({"profile": store.export_dict(prof),
                   "losses": [f.to_json() for f in conv.problems(not no_check_files)],
                   "approximated": [f.to_json() for f in conv.notes],
                   "nvram": conv.nvram})
        return
    for f in conv.problems(not no_check_files):
        err(f"kvmrun: lost: {f}")
    sys.stdout.write(profile_text(prof, conv, not no_check_files))
