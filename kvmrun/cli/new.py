"""`kvmrun new` (a profile with good defaults for an OS, defined in one step) and
`kvmrun os list|show` (the distribution's osinfo-db). Thin: kvmrun.ops.new and
kvmrun.ops.osinfo do the work."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from kvmrun.cli.app import app, emit_json, err, lazy, out

osinfo = lazy("kvmrun.ops.osinfo")
newops = lazy("kvmrun.ops.new")

os_app = typer.Typer(help="Operating systems known to osinfo-db (the database virt-install "
                          "uses): presets for `kvmrun new --os ID`.", no_args_is_help=True)
app.add_typer(os_app, name="os")


def _gib(v):
    return f"{v}G" if v else "-"


def _mib(v):
    return "-" if not v else (f"{v // 1024}G" if v % 1024 == 0 else f"{v}M")


@os_app.command("list")
def os_list(
    search: Optional[str] = typer.Argument(None, metavar="[SEARCH]",
                                           help="Words that must all appear in the id, "
                                                "name, vendor or codename."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list."),
) -> None:
    """List operating systems: id, name, recommended RAM, vCPUs and disk, virtio, firmware.

    `kvmrun os list debian`, `kvmrun os list windows 11`."""
    entries = osinfo.search(search)
    if as_json:
        emit_json([e.to_json() for e in entries])
        return
    if not entries:
        err(f"no OS matches {search!r} (`kvmrun os list` shows all)")
        raise typer.Exit(1)
    rows = [("ID", "NAME", "RAM", "CPUS", "DISK", "VIRTIO", "FIRMWARE")]
    for e in entries:
        rec = _suggest(e)
        rows.append((e.short_id, e.name, _mib(rec["memory_mib"]), str(rec["cpus"]),
                     _gib(rec["disk_gib"]), "yes" if e.virtio_disk else "no",
                     e.firmware or ("bios/uefi" if e.uefi_supported else "bios")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _suggest(entry) -> dict:
    return newops.suggested(entry)


@os_app.command("show")
def os_show(
    os_id: str = typer.Argument(..., metavar="ID", help="A short id (debian11, win11) or URI."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Everything kvmrun takes from one osinfo-db entry, and the defaults `kvmrun new`
    derives from it."""
    e = osinfo.get(os_id)
    rec = _suggest(e)
    if as_json:
        emit_json({**e.to_json(), "kvmrun_new_defaults": rec})
        return
    rows = [("id", f"{e.short_id}  ({', '.join(e.short_ids[1:]) or 'no aliases'})"),
            ("uri", e.id), ("name", e.name), ("vendor", e.vendor or "-"),
            ("family", f"{e.family or '-'}  distro {e.distro or '-'}"),
            ("released", e.release_date or "-"), ("end of life", e.eol_date or "-"),
            ("minimum", f"ram {_mib(e.minimum.ram_mib)}  cpus {e.minimum.cpus or '-'}  "
                        f"disk {_gib(e.minimum.storage_gib)}"),
            ("recommended", f"ram {_mib(e.recommended.ram_mib)}  cpus "
                            f"{e.recommended.cpus or '-'}  disk {_gib(e.recommended.storage_gib)}"),
            ("virtio", f"disk {'yes' if e.virtio_disk else 'no'}  nic "
                       f"{'yes' if e.virtio_net else 'no'}  (nic model {e.nic_model or '-'})"),
            ("firmware", e.firmware or ("bios or uefi" if e.uefi_supported else "bios")),
            ("arches", ", ".join(e.arches) or "-"),
            ("kvmrun new", f"memory {_mib(rec['memory_mib'])}  smp {rec['cpus']}  "
                           f"disk {rec['disk_gib']}G"),
            ("file", e.file)]
    for key, value in rows:
        out(f"  {key:<12}{value}")


def _ask(answers: dict) -> None:
    """virt-manager's order: install mode, its source, OS type, RAM and CPUs, storage.
    Only questions whose answer was not given on the command line are asked."""
    if newops.install_mode(answers["cdrom"], answers["kernel"], answers["import_disk"],
                           answers["pxe"]) == "none":
        mode = typer.prompt("install from: cdrom, kernel, import, pxe or none",
                            default="cdrom")
        if mode == "cdrom":
            answers["cdrom"] = typer.prompt("ISO image")
        elif mode == "kernel":
            answers["kernel"] = typer.prompt("kernel")
            answers["initrd"] = typer.prompt("initrd (empty: none)", default="") or None
        elif mode == "import":
            answers["import_disk"] = typer.prompt("existing disk image")
        elif mode == "pxe":
            answers["pxe"] = True
    if answers["os_id"] is None and osinfo.available():
        while True:
            text = typer.prompt("operating system (an id, a search word, or empty: generic)",
                                default="", show_default=False)
            if not text:
                break
            found = osinfo.search(text)
            if any(text in e.short_ids for e in found):
                answers["os_id"] = text
                break
            out("  " + (", ".join(e.short_id for e in found[:12]) or "no match"))
    entry = osinfo.get(answers["os_id"]) if answers["os_id"] else None
    hint = newops.suggested(entry)
    if answers["memory"] is None:
        answers["memory"] = typer.prompt("memory", default=_mib(hint["memory_mib"]))
    if answers["cpus"] is None:
        answers["cpus"] = typer.prompt("vCPUs", default=hint["cpus"], type=int)
    if answers["disk"] is None and not answers["import_disk"]:
        answers["disk"] = typer.prompt("disk: a size for a new disk, a path, or none",
                                       default=f"{hint['disk_gib']}G")


@app.command()
def new(
    name: str = typer.Argument(..., metavar="NAME", help="The new VM's name."),
    os_id: Optional[str] = typer.Option(None, "--os", metavar="ID",
                                        help="OS preset from osinfo-db (`kvmrun os list`)."),
    cdrom: Optional[str] = typer.Option(None, "--cdrom", metavar="ISO",
                                        help="Install from an ISO image."),
    kernel: Optional[str] = typer.Option(None, "--kernel", metavar="K",
                                         help="Install (or boot) a kernel directly."),
    initrd: Optional[str] = typer.Option(None, "--initrd", metavar="I",
                                         help="Initial ramdisk for --kernel."),
    append: Optional[str] = typer.Option(None, "--append", metavar="CMDLINE",
                                         help="Kernel command line for --kernel."),
    import_disk: Optional[str] = typer.Option(None, "--import", metavar="DISK",
                                              help="Boot an existing disk image."),
    pxe: bool = typer.Option(False, "--pxe", help="Boot from the network."),
    memory: Optional[str] = typer.Option(None, "--memory", "-m", metavar="SIZE",
                                         help="RAM (default: the OS's recommendation)."),
    cpus: Optional[int] = typer.Option(None, "--cpus", metavar="N", help="vCPUs."),
    disk: Optional[str] = typer.Option(None, "--disk", metavar="SIZE|PATH|none",
                                       help="A new qcow2 disk of SIZE (default: the OS's "
                                            "recommendation), an existing image, or none."),
    pool: Optional[str] = typer.Option(None, "--pool", metavar="POOL",
                                       help="Make the new disk in this storage pool."),
    network: Optional[str] = typer.Option(None, "--network", metavar="SPEC",
                                          help="user (default), none, isolated:NAME, "
                                               "nat[:NAME] or bridge:BRIDGE."),
    uefi: bool = typer.Option(False, "--uefi", help="UEFI firmware (implied when the OS "
                                                    "refuses BIOS)."),
    display: Optional[str] = typer.Option(None, "--display", metavar="vnc|none|…",
                                          help="Default: vnc for --cdrom and --pxe, else "
                                               "none (the serial console)."),
    start: bool = typer.Option(False, "--start", help="Start it after defining."),
    print_only: bool = typer.Option(False, "--print", help="Print the profile; define "
                                                            "nothing."),
    force: bool = typer.Option(False, "--force", help="Replace a VM of that name."),
) -> None:
    """Write a profile with good defaults for an OS and define it (virt-install's job).

    On a terminal, missing answers are asked step by step (install mode, OS, memory, CPUs,
    disk); with standard input not a terminal nothing is asked and defaults apply.

    `kvmrun new web1 --os debian11 --cdrom debian-11.iso`,
    `kvmrun new tiny --kernel vmlinuz --initrd initrd.img --disk none --print`."""
    answers = dict(os_id=os_id, cdrom=cdrom, kernel=kernel, initrd=initrd,
                   import_disk=import_disk, pxe=pxe, memory=memory, cpus=cpus, disk=disk)
    if sys.stdin.isatty() and not print_only:
        _ask(answers)
    data = newops.new_profile(name, append=append, pool=pool, network=network, uefi=uefi,
                              display=display, **answers)
    if print_only:
        import yaml
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
        return
    _define_and_start(data, force, start)


def _define_and_start(data: dict, force: bool, start: bool) -> None:
    """`kvmrun define` of the new profile (kvmrun.ops.new.define), then `start`."""
    result = newops.define(data, force=force, start=start, note=err)
    for warning in result["warnings"]:
        err(f"kvmrun: warning: {warning}")
    out(f"{result['outcome']} {result['name']} ({result['path']})")
    if start:
        out(f"started {result['name']} (pid {result['started'].get('pid')})")
    else:
        out(f"  start it: kvmrun start {result['name']}")
