"""libvirt domain XML on the command line: `kvmrun convert FILE.xml` (`kvmrun import
FILE.xml` and `export --format libvirt` are in kvmrun.cli.defined)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from kvmrun.cli.app import app, emit_json, err, lazy

defined = lazy("kvmrun.ops.defined")
libvirt = lazy("kvmrun.ops.libvirt")

Lossy = typer.Option(False, "--lossy", help="Convert even though some settings have no kvmrun "
                                            "counterpart (each is listed, and named in the "
                                            "profile's comment block).")


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
    prof, conv = libvirt.read_domain(xml_file, name, lossy, not no_check_files)
    if as_json:
        emit_json({"profile": defined.export_dict(prof),
                   "losses": [f.to_json() for f in conv.problems(not no_check_files)],
                   "approximated": [f.to_json() for f in conv.notes],
                   "nvram": conv.nvram})
        return
    for f in conv.problems(not no_check_files):
        err(f"kvmrun: lost: {f}")
    sys.stdout.write(libvirt.profile_text(prof, conv, not no_check_files))
