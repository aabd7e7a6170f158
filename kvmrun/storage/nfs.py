"""NFS storage pools (libvirt's netfs), reached one of two ways:

  kernel     `mount -t nfs SERVER:/EXPORT DIR` (root, and a kernel with the NFS client);
             the pool is then a directory pool on the mount point
  userspace  QEMU and qemu-img open the volumes themselves through QEMU's NFS block driver
             (libnfs, Debian's qemu-block-extra): a volume is nfs://SERVER/EXPORT/VOLUME,
             given to QEMU in that URL form (`-drive file=nfs://…`), which QEMU 7.2 accepts and
             reports back in query-block. QEMU 7.2 speaks NFSv3, so the server's rpcbind
             must be reachable (port 111) as well as NFS (2049) and mountd.

File operations qemu-img has no verb for go through libnfs itself (kvmrun.storage.nfsclient:
ctypes on libnfs.so.13). Every failure becomes an `NfsError` whose hint says what to check."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from kvmrun import proc
from kvmrun.errors import HostError, KvmrunError, NfsError
from kvmrun.paths import data_dir
from kvmrun.storage.nfsclient import (  # noqa: F401  (the NFS API callers use is here)
    Export, exists, explain, is_url, place, split_url, unlink, url)

ACCESS = ("kernel", "userspace")
HOST_RE = r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?"      # a host name or IPv4 address
EXPORT_RE = r"/[A-Za-z0-9._+/-]*"


# ---------------------------------------------------------------- names and URLs

def parse_source(text: str) -> tuple[str, str]:
    """'SERVER:/EXPORT' -> (server, '/export'), the export without a trailing slash."""
    server, sep, export = (text or "").partition(":")
    if not sep or not re.fullmatch(HOST_RE, server) or not re.fullmatch(EXPORT_RE, export) \
            or "//" in export or "/../" in export + "/" or "/./" in export + "/":
        raise NfsError(f"{text!r} is not an NFS source",
                       hint="write SERVER:/EXPORT, e.g. nas.example.org:/srv/vms "
                            "(a host name or IPv4 address, then an absolute path)")
    return server, export.rstrip("/") or "/"

# ---------------------------------------------------------------- which access

def kernel_possible() -> str | None:
    """None where `mount -t nfs` can work, else why not."""
    if os.geteuid() != 0:
        return "mounting needs root"
    if not (proc.which("mount.nfs") or os.path.exists("/sbin/mount.nfs")
            or os.path.exists("/usr/sbin/mount.nfs")):
        return "mount.nfs is not installed (apt-get install nfs-common)"
    try:
        kernel_fs = Path("/proc/filesystems").read_text()
    except OSError:
        kernel_fs = ""
    if "\tnfs\n" not in kernel_fs and not glob.glob(f"/lib/modules/{os.uname().release}/"
                                                     "kernel/fs/nfs/nfs.ko*"):
        return "the kernel has no NFS client"
    return None


def userspace_driver() -> str | None:
    """None when QEMU's NFS block driver is installed, else the hint."""
    if glob.glob("/usr/lib/*/qemu/block-nfs.so") or glob.glob("/usr/lib/qemu/block-nfs.so"):
        return None
    return "QEMU's NFS block driver is missing: apt-get install qemu-block-extra"


def choose_access(requested: str | None) -> str:
    if requested not in (None, *ACCESS):
        raise NfsError(f"unknown NFS access {requested!r}", hint="kernel or userspace")
    if requested == "kernel" or (requested is None and kernel_possible() is None):
        why = kernel_possible()
        if why:
            raise NfsError(f"--access kernel cannot work here: {why}",
                           hint="use --access userspace (QEMU opens the volumes itself)")
        return "kernel"
    why = userspace_driver()
    if why:
        raise HostError(why.split(":")[0], hint=why.split(": ", 1)[1])
    return "userspace"


# ---------------------------------------------------------------- the kernel path

def default_mount_dir(pool: str) -> str:
    return str(data_dir() / "nfs" / pool)


def mount_command(server: str, export: str, mount_dir: str, options: str | None) -> list[str]:
    opts = ",".join(o for o in ("rw", options or "") if o)
    return ["mount", "-t", "nfs", "-o", opts, f"{server}:{export}", mount_dir]


def umount_command(mount_dir: str) -> list[str]:
    return ["umount", mount_dir]


def mounted(mount_dir: str, mountinfo: str | None = None) -> bool:
    """Is an NFS file system mounted exactly at mount_dir (from /proc/self/mountinfo)?"""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return False
    target = os.path.realpath(mount_dir)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and " - " in line:
            fstype = line.split(" - ", 1)[1].split()[0]
            point = fields[4].encode().decode("unicode_escape")
            if point == target and fstype.startswith("nfs"):
                return True
    return False


def mount(pool: dict) -> bool:
    """Mount a kernel-access pool unless it is mounted; True if this call mounted it."""
    if mounted(pool["mount_dir"]):
        return False
    os.makedirs(pool["mount_dir"], exist_ok=True)
    _run(mount_command(pool["server"], pool["export"], pool["mount_dir"], pool.get("options")),
         f"cannot mount {pool['source']}")
    return True


def umount(pool: dict) -> bool:
    if not mounted(pool["mount_dir"]):
        return False
    _run(umount_command(pool["mount_dir"]), f"cannot unmount {pool['mount_dir']}")
    return True


def _run(argv: list[str], what: str) -> None:
    try:
        out = proc.run(argv, check=False, timeout=120, env={**os.environ, "LC_ALL": "C"},
                       what=f"{what}: {argv[0]}")
    except HostError as err:
        if "did not finish" not in err.message:
            raise
        raise NfsError(err.message, hint="is the server reachable?") from None
    if out.returncode != 0:
        raise explain(out.stderr, what)

# ---------------------------------------------------------------- pools

def record(name: str, source: str | None = None, mount_dir: str | None = None,
           options: str | None = None, access: str | None = None) -> dict:
    """The JSON record of an NFS pool; a userspace pool's export is mounted once through
    libnfs to check that it is there (nothing is written when that fails)."""
    if not source:
        raise NfsError("an nfs pool needs its export: --source SERVER:/EXPORT",
                       hint=f"kvmrun pool define {name} --type nfs --source nas:/srv/vms")
    server, export = parse_source(source)
    if options is not None and not re.fullmatch(r"[A-Za-z0-9_.=,:/-]+", options):
        raise NfsError(f"{options!r} are not mount options",
                       hint="comma-separated, as for mount -o: vers=4.2,soft,timeo=100")
    chosen = choose_access(access)
    if chosen == "userspace" and (mount_dir or options):
        raise NfsError("--mount-dir and --options are for --access kernel (userspace access "
                       "mounts nothing: QEMU opens nfs:// URLs itself)")
    rec = {"type": "nfs", "source": f"{server}:{export}", "server": server, "export": export,
           "access": chosen}
    if chosen == "kernel":
        rec["mount_dir"] = os.path.abspath(mount_dir or default_mount_dir(name))
        rec["options"] = options
        rec["path"] = rec["mount_dir"]
    else:
        rec["path"] = url(server, export)
        with Export(server, export):
            pass
    return rec


def volume_path(pool: dict, volume: str) -> str:
    if pool.get("access") == "kernel":
        mount(pool)                              # mounted on first use
        return os.path.join(pool["mount_dir"], volume)
    return url(pool["server"], pool["export"], volume)


def usage(pool: dict) -> dict:
    """Capacity and free space of the export (statvfs over NFS, or of the mount point)."""
    try:
        if pool.get("access") == "kernel":
            if not mounted(pool["mount_dir"]):
                return {"capacity": None, "free": None, "available": False, "mounted": False}
            st = os.statvfs(pool["mount_dir"])
            return {"capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
                    "available": True, "mounted": True}
        with Export(pool["server"], pool["export"]) as ex:
            return {**ex.statvfs(), "available": True}
    except (OSError, KvmrunError) as err:
        return {"capacity": None, "free": None, "available": False,
                "error": getattr(err, "message", str(err))}


def files(pool: dict) -> list[dict]:
    """The export's image files: name, address (URL or path) and size in bytes."""
    if pool.get("access") == "kernel":
        mount(pool)
        root = Path(pool["mount_dir"])
        return [{"name": p.name, "path": str(p), "size": p.stat().st_size}
                for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    with Export(pool["server"], pool["export"]) as ex:
        return [{"name": e["name"], "path": url(pool["server"], pool["export"], e["name"]),
                 "size": e["size"]} for e in ex.listdir()
                if e["file"] and not e["name"].startswith(".")]
