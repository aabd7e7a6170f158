"""Storage verbs: disk create/info/rebase/resize/delete, snapshot create/list/revert/delete, pool
define/undefine/list/info/start/stop, and ssh. Thin: each parses, calls kvmrun.storage, prints."""

from __future__ import annotations

import os
import shlex
import time
from typing import List, Optional

import typer

from kvmrun.cli.app import app, emit_json, err, guest, lazy, out
from kvmrun.errors import KvmrunError
from kvmrun.guest.rundir import guest_using
from kvmrun.ops import ssh as sshcmd
from kvmrun.storage import images, lvm, pools
from kvmrun.storage.images import human

disks = lazy("kvmrun.storage.disks")
rebase = lazy("kvmrun.storage.rebase")
snapops = lazy("kvmrun.ops.snapshots")

disk_app = typer.Typer(help="Disk images (on top of qemu-img).", no_args_is_help=True)
snapshot_app = typer.Typer(help="Internal qcow2 snapshots of a VM's disks.",
                           no_args_is_help=True)
app.add_typer(disk_app, name="disk")
app.add_typer(snapshot_app, name="snapshot")
pool_app = typer.Typer(help="Storage pools: directories of disk images, LVM volume "
                            "groups, or NFS exports.",
                       no_args_is_help=True)
app.add_typer(pool_app, name="pool")


def _show_info(info: dict) -> None:
    out(info["path"])
    rows = [("format", info.get("format")),
            ("size", f"{human(info.get('virtual_size'))} ({info.get('virtual_size')} bytes)"),
            ("on disk", human(info.get("actual_size")))]
    if info.get("backing_file"):
        rows.append(("backing", f"{info['backing_file']} ({info.get('backing_format') or '?'})"))
        for deeper in info.get("backing_chain", [])[1:]:
            rows.append(("  then", deeper))
    for snap in info.get("snapshots", []):
        rows.append(("snapshot", snap["name"]))
    for key, value in rows:
        out(f"  {key:<9}{value}")


@disk_app.command("create")
def disk_create(
    path: str = typer.Argument(..., metavar="PATH|VOLUME",
                               help="The image to create (a volume name with --pool)."),
    pool: Optional[str] = typer.Option(None, "--pool", metavar="NAME",
                                       help="Create the volume in this storage pool (in an "
                                            "lvm pool: a logical volume, raw)."),
    size: Optional[str] = typer.Option(None, "--size", "-s", metavar="SIZE",
                                       help="Virtual size: 512M, 20G, 1.5T (default with "
                                            "--backing: the base's)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", metavar="qcow2|raw",
                                      help="Default: qcow2 (raw in an lvm pool)."),
    backing: Optional[str] = typer.Option(None, "--backing", "-b", metavar="BASE",
                                          help="Make a qcow2 overlay on BASE (never written)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a disk image (never overwrites; a failure leaves no file or volume)."""
    size_bytes = images.parse_disk_size(size)[1] if size is not None else None
    if pool:
        info = pools.create_volume(pool, path, size_bytes, fmt, backing)
    else:
        info = images.create(path, size_bytes, fmt, backing)
    if as_json:
        emit_json(info)
        return
    out(f"created {info['path']} ({info['format']}, {human(info['virtual_size'])}"
        + (f", on {info['backing_file']})" if info.get("backing_file") else ")"))


@disk_app.command("delete")
def disk_delete(
    path: str = typer.Argument(..., metavar="PATH|VOLUME",
                               help="The image file (a volume name with --pool)."),
    pool: Optional[str] = typer.Option(None, "--pool", metavar="NAME",
                                       help="Delete the volume from this storage pool."),
) -> None:
    """Delete a disk image or a pool's volume (refused while a running guest uses it)."""
    gone = pools.delete_volume(pool, path)
    out(f"deleted {gone['path']}")


@disk_app.command("info")
def disk_info(path: str = typer.Argument(..., metavar="PATH"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Format, sizes, backing chain and snapshots of an image."""
    info = images.info(path)
    user = guest_using(path)
    info["in_use_by"] = user[0] if user else None
    if as_json:
        emit_json(info)
        return
    _show_info(info)
    if user:
        out(f"  {'in use':<9}by running guest {user[0]} (disk{user[1]})")


@disk_app.command("rebase")
def disk_rebase(
    path: str = typer.Argument(..., metavar="DISK", help="A qcow2 overlay."),
    backing: str = typer.Option(..., "--backing", "-b", metavar="NEW",
                                help="Its new base: a copy of the old one (moved, renamed)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Point a qcow2 overlay at another base without copying data (qemu-img rebase -u).

    Right only when NEW holds what the old base held. Checked first: DISK is qcow2 and not
    in use, NEW exists (its format, qcow2 or raw, is written into DISK), NEW is not larger
    than DISK (an overlay starts at its base's size and only grows) and, while the old base
    is readable, NEW has its size. `kvmrun validate` says when a profile's backing: and the
    overlay's own base differ."""
    result = rebase.rebase(path, backing)
    if as_json:
        emit_json(result)
        return
    if not result["changed"]:
        out(f"{result['path']} is already based on {result['backing_file']}")
        return
    out(f"rebased {result['path']}: {result['old_backing'] or 'no base'} -> "
        f"{result['backing_file']} ({result['backing_format']})")


@disk_app.command("resize", context_settings={"ignore_unknown_options": True})  # -1G
def disk_resize(
    path: str = typer.Argument(..., metavar="PATH"),
    size: str = typer.Argument(..., metavar="SIZE", help="New size (30G) or change (+5G, -1G)."),
    shrink: bool = typer.Option(False, "--shrink", help="Allow making the disk smaller."),
    live: Optional[str] = typer.Option(None, "--live", metavar="NAME",
                                       help="Resize through this running guest's QEMU "
                                            "(automatic when a running guest has the disk)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Grow (or with --shrink, shrink) a disk image. A disk a running guest has open is
    resized live through QMP block_resize; the guest then sees the new size."""
    result = disks.resize(path, size, shrink=shrink, live=live)
    if as_json:
        emit_json(result)
        return
    how = f" live in {result['live']}" if result.get("live") else ""
    out(f"resized {result['path']}{how}: {human(result['old_size'])} -> "
        f"{human(result['virtual_size'])}")


# ---------------------------------------------------------------- snapshots

def _snapshot_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json(rows)
        return
    out(f"{'NAME':<24} {'DATE':<19} {'VM STATE':>9}  DISKS")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["date"])) if r[
            "date"] else "-"
        label = r["name"] + (" *" if r.get("next_start") else "")
        out(f"{label:<24} {when:<19} {human(r['vm_state_size']) if r['vm_state_size'] else '-':>9}"
            f"  {', '.join(os.path.basename(d) for d in r['disks'])}")


NameOrProfile = typer.Argument(..., metavar="NAME", help="A guest, defined VM or profile.")


@snapshot_app.command("create")
def snapshot_create(name: str = NameOrProfile,
                    snap: Optional[str] = typer.Argument(None, metavar="[SNAP]",
                                                         help="Default: snap-DATE-TIME."),
                    disk_only: bool = typer.Option(False, "--disk-only",
                                                   help="Running guest: the disks only, "
                                                        "without the VM state (what a "
                                                        "guest with a virtiofs share can "
                                                        "take)."),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Take a snapshot: with the VM state while the guest runs (savevm), of the disks with
    qemu-img while it is stopped.

    A running guest's file systems are frozen for it through its guest agent
    (guest-fsfreeze-freeze, then -thaw, also on failure), so its disks are consistent. When
    the agent does not answer (within 5 s) the snapshot is taken anyway, crash-consistent,
    with a note; --json says "frozen": true or false.

    --disk-only (running guest): the disks' snapshots, all at once (a QMP transaction),
    frozen the same way, without the VM state: a guest with a device QEMU cannot save
    (a virtiofs share) can take only these. Revert one with the VM stopped; it boots from
    the disks."""
    result = snapops.run(name, "create", snap, disk_only=disk_only, note=err)
    if as_json:
        emit_json(result)
        return
    what = "disks only" if disk_only else "with VM state"
    out(f"created snapshot {result['snapshot']} of {name}"
        + (f" (running: {what}" + (", file systems frozen)" if result["frozen"] else ")")
           if result["live"] else ""))


@snapshot_app.command("list")
def snapshot_list(name: str = NameOrProfile, as_json: bool = typer.Option(False, "--json")
                  ) -> None:
    """The snapshots of a VM's disks; `*` marks the one whose RAM state the next start
    loads (after an offline revert; "next_start" in --json)."""
    _snapshot_rows(snapops.listing(name), as_json)


@snapshot_app.command("revert")
def snapshot_revert(name: str = NameOrProfile,
                    snap: str = typer.Argument(..., metavar="SNAP"),
                    disk_only: bool = typer.Option(False, "--disk-only",
                                                   help="Stopped VM: do not load the "
                                                        "snapshot's RAM state at the next "
                                                        "start; boot from the disks."),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Go back to a snapshot (loadvm while running, qemu-img snapshot -a while stopped).

    While the VM is stopped, a snapshot taken with RAM state (VM STATE in `snapshot list`)
    reverts the disks at once, and the next start loads its RAM state (-loadvm): the guest
    goes on from the moment of the snapshot instead of booting. Once: the start after boots
    normally. --disk-only skips that (the guest boots from the reverted disks)."""
    result = snapops.run(name, "revert", snap, disk_only=disk_only)
    if as_json:
        emit_json(result)
        return
    out(f"reverted {name} to {snap}")
    if result["note"]:
        out(result["note"])


@snapshot_app.command("delete")
def snapshot_delete(name: str = NameOrProfile,
                    snap: str = typer.Argument(..., metavar="SNAP")) -> None:
    """Delete a snapshot."""
    snapops.run(name, "delete", snap)
    out(f"deleted snapshot {snap} of {name}")


# ---------------------------------------------------------------- ssh

@app.command()
def ssh(
    name: str = typer.Argument(..., metavar="NAME", help="A running guest."),
    command: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD...]"),
    user: Optional[str] = typer.Option(None, "-l", "--user",
                                       help="Login name (default: the profile's ssh.user)."),
    identity: Optional[str] = typer.Option(None, "-i", "--identity", metavar="KEY",
                                           help="Private key file (default: ssh.identity, "
                                                "or the private half of a "
                                                "cloud_init.ssh_authorized_keys .pub file)."),
    wait: float = typer.Option(120.0, "--wait", metavar="SECONDS", min=0,
                               help="How long to wait for the guest's sshd to answer."),
    print_: bool = typer.Option(False, "--print", help="Print the ssh command instead of "
                                                        "running it."),
) -> None:
    """ssh into a guest through its user-network forward to port 22 (host keys of
    throwaway guests are not remembered). Waits (up to --wait) while the guest's sshd is not
    up yet; exit code is ssh's (5 when sshd never answered)."""
    target = guest(name)
    found = sshcmd.session(target, user, identity, command or [])
    if print_:
        out(shlex.join(found["argv"]))
        return
    code = sshcmd.connect(target, found, wait, note=err)
    hint = sshcmd.explain(code, found["user"])
    if hint:
        err(f"kvmrun: {hint.replace('NAME', name)}")
    raise typer.Exit(code)


# ---------------------------------------------------------------- pools

@pool_app.command("define")
def pool_define(name: str = typer.Argument(..., metavar="NAME"),
                directory: Optional[str] = typer.Argument(None, metavar="[DIRECTORY]",
                                                          help="A dir pool's directory (made "
                                                               "if missing)."),
                type_: str = typer.Option("dir", "--type", "-t", metavar="dir|lvm|nfs",
                                          help="dir: image files in DIRECTORY; lvm: logical "
                                               "volumes of the volume group --vg; nfs: image "
                                               "files on the NFS export --source."),
                vg: Optional[str] = typer.Option(None, "--vg", metavar="VGNAME",
                                                 help="An lvm pool's (existing) volume group."),
                source: Optional[str] = typer.Option(None, "--source", metavar="SERVER:/EXPORT",
                                                     help="An nfs pool's export."),
                mount_dir: Optional[str] = typer.Option(
                    None, "--mount-dir", metavar="DIR",
                    help="nfs, access kernel: where to mount it (default: under the data "
                         "directory)."),
                options: Optional[str] = typer.Option(None, "--options", "-o", metavar="OPTS",
                                                      help="nfs, access kernel: mount -o "
                                                           "options (vers=4.2,soft)."),
                access: Optional[str] = typer.Option(
                    None, "--access", metavar="kernel|userspace",
                    help="nfs: mount the export (kernel; root and the kernel's NFS client) or "
                         "let QEMU open nfs:// URLs itself (userspace, qemu-block-extra). "
                         "Default: kernel where mount -t nfs can work, else userspace."),
                ) -> None:
    """Define a directory pool (NAME DIRECTORY), an LVM pool (NAME --type lvm --vg VG) or an
    NFS pool (NAME --type nfs --source SERVER:/EXPORT)."""
    given = {k: v for k, v in (("source", source), ("mount_dir", mount_dir),
                               ("options", options), ("access", access)) if v is not None}
    pool = pools.define(name, directory, type=type_, vg=vg,
                        nfs=given if (given or type_ == "nfs") else None)
    if pool["type"] == "nfs":
        out(f"defined pool {name} on NFS export {pool['source']} (access {pool['access']}: "
            + (f"mounted at {pool['mount_dir']})" if pool["access"] == "kernel"
               else f"QEMU opens {pool['path']}/VOLUME)"))
    elif pool["type"] == "lvm":
        out(f"defined pool {name} on LVM volume group {pool['vg']}")
    else:
        out(f"defined pool {name} at {pool['path']}")


@pool_app.command("undefine")
def pool_undefine(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Forget a pool (its directory or volume group, and its volumes, stay)."""
    pool = pools.undefine(name)
    if pool.get("type") == "lvm":
        out(f"undefined pool {name} (its volumes stay in volume group {pool['vg']})")
    else:
        out(f"undefined pool {name} (its volumes stay in {pool['path']})")


@pool_app.command("list")
def pool_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The defined pools: type, volumes, free space, directory or volume group."""
    rows = []
    for name in pools.names():
        pool = pools.usage(name)
        try:
            count = len(pools.volumes(name)) if pool["available"] else 0
        except KvmrunError:
            count = 0
        rows.append({**pool, "type": pool.get("type", "dir"), "volumes": count})
    if as_json:
        emit_json(rows)
        return
    out(f"{'NAME':<16} {'TYPE':<4} {'VOLUMES':>7} {'FREE':>10}  PATH")
    for r in rows:
        where = f"{r['path']} (VG {r['vg']})" if r["type"] == "lvm" else r["path"]
        out(f"{r['name']:<16} {r['type']:<4} {r['volumes']:>7} {human(r['free']):>10}  {where}"
            + ("" if r["available"] else "  (missing)"))


@pool_app.command("info")
def pool_info(name: str = typer.Argument(..., metavar="NAME"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """A pool's directory or volume group, space and volumes."""
    usage = pools.usage(name)
    if usage.get("type") == "lvm" and not usage["available"]:
        lvm.vg_report(usage["vg"])           # raises the reason (VG gone, no LVM, not root)
    if usage.get("type") == "nfs" and usage.get("error"):
        pools.volumes(name)                    # raises the reason (server down, export gone)
    info = {**usage, "type": usage.get("type", "dir"), "volumes": pools.volumes(name)}
    if as_json:
        emit_json(info)
        return
    out(f"{name}")
    if info["type"] == "lvm":
        out(f"  {'type':<9}lvm (volume group {info['vg']}, volumes are {info['path']}/NAME)")
    elif info["type"] == "nfs":
        out(f"  {'type':<9}nfs (export {info['source']})")
        out(f"  {'access':<9}{info['access']}: " + (
            f"mounted at {info['mount_dir']}" if info["access"] == "kernel" else
            f"QEMU opens {info['path']}/VOLUME itself"))
    else:
        out(f"  {'path':<9}{info['path']}")
    out(f"  {'space':<9}{human(info['free'])} free of {human(info['capacity'])}")
    for v in info["volumes"]:
        out(f"  {'volume':<9}{v['name']}  {v['format']}  {human(v['virtual_size'])}"
            + (f"  on {v['backing_file']}" if v["backing_file"] else "")
            + (f"  in use by {v['in_use_by']}" if v["in_use_by"] else "")
            + ("  open" if v.get("open") and not v["in_use_by"] else ""))


@pool_app.command("start")
def pool_start(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Make a pool usable: mount an nfs pool with access kernel, check any other pool.

    A kernel-access nfs pool is also mounted on first use (disk create, a guest's start)."""
    out(pools.start(name))


@pool_app.command("stop")
def pool_stop(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Unmount an nfs pool with access kernel (refused while a running guest uses it)."""
    out(pools.stop(name))
