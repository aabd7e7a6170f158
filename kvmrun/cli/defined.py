"""Verbs on defined VMs: define, undefine, edit, export, import, defined.

Thin: each command calls kvmrun.ops.defined and prints through kvmrun.cli.app's `out`/`err`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from kvmrun.cli.app import app, emit_json, err, lazy, out
from kvmrun.errors import Conflict, KvmrunError, ProfileError, each_error

store = lazy("kvmrun.ops.defined")
libvirt = lazy("kvmrun.ops.libvirt")
libvirt_export = lazy("kvmrun.libvirt.export")

_REF_HELP = ("A profile file or the name of a defined VM. A path wins when it contains '/' or "
             "ends in .yaml (write ./web for a file named web).")

NoCheckFiles = typer.Option(False, "--no-check-files",
                            help="Do not require disk, ISO, kernel and firmware files to exist.")
Force = typer.Option(False, "--force", "-f", help="Replace a different VM of the same name.")
NewUuid = typer.Option(False, "--new-uuid",
                       help="Derive the uuid from the (new) name instead of keeping the one in "
                            "the file (for a copy rather than a move).")


def _warn(warnings) -> None:
    for w in warnings:
        err(f"kvmrun: warning: {w}")


def _define(prof, name, force, no_check_files, new_uuid, verb: str) -> None:
    result = store.define(prof, name, force=force, check_files=not no_check_files,
                          new_uuid=new_uuid)
    _warn(result.warnings)
    if result.outcome == "unchanged":
        out(f"{result.name} is already defined with this profile ({result.path})")
    elif result.outcome == "replaced":
        out(f"re{verb} {result.name} ({result.path}), replacing the previous profile")
    else:
        out(f"{verb} {result.name} ({result.path})")
    return result


def _missing_hint(e) -> None:
    errors = each_error(e)
    if any(x.location.path and x.reason.endswith("not found") for x in errors):
        err("  hint: fix the paths, or pass --no-check-files and fix them later with "
            "`kvmrun edit`")


@app.command()
def define(
    profile_file: str = typer.Argument(..., metavar="FILE", help=_REF_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Define it under this name."),
    sets: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                             help="Override a profile key before defining, "
                                                  "e.g. --set memory=4G (repeatable)."),
    force: bool = Force,
    no_check_files: bool = NoCheckFiles,
    new_uuid: bool = NewUuid,
) -> None:
    """Define a named VM from a profile file.

    Afterwards `kvmrun start NAME` (and every PROFILE argument) finds it. The profile is validated (keys, files, machine type and CPU model) and stored
    self-contained in $KVMRUN_CONFIG_DIR/vms/NAME.yaml (default ~/.config/kvmrun, /etc/kvmrun
    for root): extends resolved, paths absolute, uuid pinned; comments are not kept.
    Defining the same profile again changes nothing; a different one needs --force.
    Exit codes: 2 invalid profile or name, 1 a different VM of that name exists.
    """
    try:
        prof = store.resolve(profile_file, sets or [])
        _define(prof, name, force, no_check_files, new_uuid, "defined")
    except ProfileError as e:
        err(f"kvmrun: error: {e}")
        _missing_hint(e)
        raise typer.Exit(e.exit_code) from None


@app.command(name="import")
def import_(
    profile_file: str = typer.Argument(..., metavar="FILE|-",
                                       help="A profile exported with `kvmrun export`, a "
                                            "libvirt domain XML (virsh dumpxml NAME), or an "
                                            "archive of `export --with-disks` (- reads it "
                                            "from stdin)."),
    name: Optional[str] = typer.Option(None, "--name", help="Import it under this name."),
    force: bool = Force,
    no_check_files: bool = NoCheckFiles,
    new_uuid: bool = NewUuid,
    lossy: bool = typer.Option(False, "--lossy", help="libvirt XML: import even though some "
                                                      "settings have no kvmrun counterpart "
                                                      "(each is listed)."),
    print_: bool = typer.Option(False, "--print", help="libvirt XML: print the converted "
                                                       "profile instead of defining it."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Archive: put the disks in this "
                                                            "directory pool."),
    directory: Optional[str] = typer.Option(None, "--dir", metavar="DIR",
                                            help="Archive: put the disks in DIR (default "
                                                 "$KVMRUN_DATA_DIR/disks/NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Archive: the result as JSON."),
) -> None:
    """Define a VM from an exported profile, a libvirt domain XML, or an archive with its
    disks (typically from another host).

    Every file the profile refers to (disk, backing image, ISO, kernel, initrd, firmware,
    shared directory, .pub key, user-data file) must exist here: all the missing ones are
    listed, with their key paths, before anything is defined (exit 2; --no-check-files
    imports anyway). An archive's own disks count as there. The uuid in the file is kept, so a
    moved VM keeps its SMBIOS UUID (--new-uuid for a copy).

    A libvirt domain (`virsh dumpxml web1 > web1.xml; kvmrun import web1.xml`) is converted
    first, as `kvmrun convert` shows it: settings kvmrun cannot express are listed with their
    XML path and stop the import unless --lossy; its <nvram> file is copied into kvmrun's
    UEFI variable store (the original is left alone).

    An archive (`kvmrun export NAME --with-disks`): every file's size and SHA-256 sum is
    checked before anything is defined, the disks land in --dir/--pool (backing chains
    rebased, holes kept), the UEFI variable store beside this host's others, the uuid kept.
    An existing VM or disk is never overwritten, and a failed or interrupted import leaves
    nothing behind. Streams: `kvmrun export web --with-disks -o - | ssh host kvmrun import -`.
    """
    from kvmrun.cli import archive
    if archive.is_archive(profile_file):
        if force or new_uuid:
            raise KvmrunError("--force and --new-uuid do not apply to an archive")
        return archive.import_(profile_file, name, pool, directory, no_check_files, as_json)
    try:
        if libvirt.is_domain_xml(profile_file):
            prof, conv = libvirt.read_domain(profile_file, name, lossy, not no_check_files)
            if print_:
                sys.stdout.write(libvirt.profile_text(prof, conv, not no_check_files))
                return
            for f in conv.problems(not no_check_files):
                err(f"kvmrun: lost: {f}")
            result = _define(prof, name, force, no_check_files or lossy, new_uuid, "imported")
            if result.outcome != "unchanged":
                libvirt.annotate(result.path, conv, not no_check_files)
                if conv.nvram:
                    out(f"copied the UEFI variables to "
                        f"{libvirt.copy_nvram(conv.nvram, result.name)}")
            return
        _define(store.load(Path(profile_file)), name, force, no_check_files, new_uuid, "imported")
    except ProfileError as e:
        err(f"kvmrun: error: {e}")
        _missing_hint(e)
        raise typer.Exit(e.exit_code) from None


@app.command()
def undefine(
    name: str = typer.Argument(..., metavar="NAME", help="A defined VM."),
    keep_nvram: bool = typer.Option(False, "--keep-nvram",
                                    help="Keep the VM's UEFI variable store and TPM "
                                         "state."),
) -> None:
    """Remove a defined VM.

    Refused while the VM runs (exit 4). Its UEFI variable store and TPM state are removed
    too unless --keep-nvram; disk images are never touched."""
    result = store.undefine(name, keep_nvram=keep_nvram)
    line = f"undefined {result.name} (removed {', '.join(map(str, result.removed))})"
    if result.kept:
        line += f"; kept {', '.join(map(str, result.kept))}"
    out(line)


@app.command()
def edit(
    name: str = typer.Argument(..., metavar="NAME", help="A defined VM."),
    no_check_files: bool = NoCheckFiles,
) -> None:
    """Edit a defined VM in $VISUAL or $EDITOR (default vi).

    The result is validated like `define`; when it is wrong the error is shown and, on a
    terminal, you are asked to edit again (otherwise exit 2, the VM unchanged). It is saved
    (atomically, in canonical form) only when valid and changed. The name cannot change.
    """
    import os
    import shlex
    import subprocess

    copy, original = store.edit_copy(name)
    keep_copy = False
    try:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        while True:
            try:
                done = subprocess.run([*shlex.split(editor), str(copy)])
            except (OSError, ValueError) as e:
                raise KvmrunError(f"cannot run the editor {editor!r}: {e}",
                                  hint="set $VISUAL or $EDITOR") from None
            if done.returncode != 0:
                raise KvmrunError(f"the editor {editor!r} exited with status "
                                  f"{done.returncode}; {name} unchanged")
            if copy.read_text(encoding="utf-8") == original:
                out(f"{name} unchanged")
                return
            try:
                prof, warnings = store.load_edited(name, copy, check_files=not no_check_files)
            except ProfileError as e:
                err(f"kvmrun: error: {e}")
                if sys.stdin.isatty() and _again():
                    continue
                err(f"kvmrun: {name} unchanged")
                raise typer.Exit(e.exit_code) from None
            _warn(warnings)
            try:
                changed = store.save_edited(name, prof, original)
            except Conflict as e:
                keep_copy = True
                raise Conflict(f"{e.message}; your version is in {copy}") from None
            out(f"edited {name} ({store.defined_path(name)})" if changed
                else f"{name} unchanged")
            return
    finally:
        if not keep_copy:
            copy.unlink(missing_ok=True)


def _again() -> bool:
    """Ask "edit again? [Y/n]" on stderr; yes unless the answer starts with n (or EOF)."""
    sys.stderr.write("edit again? [Y/n] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except (OSError, KeyboardInterrupt):
        answer = ""
    if not answer:
        sys.stderr.write("\n")
        return False
    return not answer.strip().lower().startswith("n")


@app.command()
def export(
    profile_ref: str = typer.Argument(..., metavar="NAME|FILE", help=_REF_HELP),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE",
                                         help="Write it to FILE instead of stdout."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML (--format json; "
                                                       "with --with-disks: the summary)."),
    fmt: str = typer.Option("yaml", "--format", metavar="yaml|json|libvirt",
                            help="yaml, json, or libvirt: a domain XML for `virsh define`."),
    with_disks: bool = typer.Option(False, "--with-disks",
                                    help="One archive with the profile, every disk and "
                                         "the UEFI variable store (-o FILE, -o - or --to)."),
    flatten: bool = typer.Option(False, "--flatten", help="--with-disks: each disk as one "
                                 "image instead of its qcow2 backing chain."),
    live: bool = typer.Option(False, "--live", help="--with-disks of a running guest: "
                              "pause it while its disks are copied beside themselves."),
    to: Optional[str] = typer.Option(None, "--to", metavar="HOST",
                                     help="--with-disks: stream it into `kvmrun import -` "
                                          "on HOST over ssh."),
) -> None:
    """Print a VM's self-contained profile (like `virsh dumpxml`), or with --with-disks
    write an archive holding its disks too.

    Extends resolved, paths absolute, defaults omitted, uuid pinned, and the files read only
    for their text inlined (.pub keys, cloud_init.user_data_file); `kvmrun import` reads it
    on another host. --format libvirt writes a libvirt domain XML instead (settings only
    kvmrun has ride along in its <metadata>, so importing it back gives the same profile).
    --with-disks writes an archive: a tar (zstd-compressed when zstd is installed) with a
    manifest of sizes and SHA-256 sums; sparse disks stay sparse. Refused while the guest
    runs unless --live."""
    import json

    if fmt not in ("yaml", "json", "libvirt"):
        raise typer.BadParameter(f"{fmt!r} is not one of yaml, json, libvirt",
                                 param_hint="--format")
    prof = store.resolve(profile_ref)
    if with_disks or to:
        from kvmrun.cli import archive
        return archive.export(prof, output, to, flatten, live, as_json)
    if fmt == "libvirt":
        text = libvirt_export.to_xml(store.pinned(prof))
    else:
        data = store.portable_dict(prof)
        text = (json.dumps(data, indent=2) + "\n" if as_json or fmt == "json"
                else store.yaml_text(data))
    if output and output != "-":
        target = Path(output).absolute()
        store.atomic_write(target, text)
        out(f"exported {prof.name} to {target}")
    else:
        sys.stdout.write(text)


def _size(mib: int | None) -> str:
    if mib is None:
        return "-"
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


@app.command()
def defined(
    as_json: bool = typer.Option(False, "--json", help="A JSON list."),
) -> None:
    """List the defined VMs: name, architecture, memory, vCPUs, disks and the file."""
    vms = store.list_defined()
    if as_json:
        emit_json([vm.to_json() for vm in vms])
        return
    if not vms:
        err(f"no defined VMs in {store.vm_dir()} (see `kvmrun define`)")
        return
    rows = [("NAME", "ARCH", "MEMORY", "VCPUS", "DISKS", "FILE")]
    for vm in vms:
        if vm.error:
            rows.append((vm.name, "-", "-", "-", "-", f"{vm.path}  (error: {vm.error})"))
        else:
            rows.append((vm.name, vm.arch or "-", _size(vm.memory), str(vm.smp),
                         str(len(vm.disks)), str(vm.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        out("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
