#!/usr/bin/env python3
"""Build a real Debian 12 cloud guest (qcow2 root disk + kernel + initrd) from Debian packages.

What Debian's genericcloud image ships, made here from the archive: Debian's cloud kernel
(`linux-image-cloud-amd64`), systemd, cloud-init, openssh-server and qemu-guest-agent, with
ifupdown + isc-dhcp-client for the network cloud-init writes. `mmdebstrap` takes the host's own
apt source files (`/etc/apt/sources.list.d/*.sources`) as its MIRROR arguments, so no mirror host
is written down anywhere; `mkfs.ext4 -d` makes the root filesystem from the tree without mounting
anything; `qemu-img convert` makes it a qcow2. Kernel and initrd are copied out
of the tree for direct boot with `root=/dev/vda rw console=ttyS0` (see `KERNEL_APPEND`).

The result is cached under ~/.cache/kvmrun/debian-<hash> (KVMRUN_GUEST_CACHE moves the parent
directory); the hash covers the package list, the customisation script and the host's apt
sources. A flock on the cache's `.lock-debian` serialises builders; a cache entry appears by
rename, so it is either complete or absent. Tests use the image as the read-only backing file
of a per-test qcow2 overlay and never write to it.

Usage:  python3 tests/guest/debian.py [--print]
API:    build_debian() -> DebianImage
Needs root (mmdebstrap's root mode, files owned by root in the image), mmdebstrap, e2fsprogs,
qemu-utils. About 100 s and 400 MiB of packages here.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUILDER_VERSION = 1          # bump when the build logic changes (part of the cache hash)
SUITE = "bookworm"
DISK_SIZE = "3G"             # the ext4 filesystem (sparse; ~1 GiB used)
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0"
USER = "debian"              # the default user Debian's cloud-init config creates
PACKAGES = (
    "linux-image-cloud-amd64", "systemd", "systemd-sysv", "udev", "dbus", "cloud-init",
    "openssh-server", "qemu-guest-agent", "ifupdown", "isc-dhcp-client", "iproute2",
    "netbase", "sudo", "procps", "e2fsprogs",
)
# Run by mmdebstrap inside the finished tree ("$1" is the tree).
CUSTOMIZE = r"""
set -e
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$1/etc/fstab"
rm -f "$1/etc/hostname" "$1/etc/ssh/ssh_host_"*
: > "$1/etc/machine-id"
printf 'auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n' \
    > "$1/etc/network/interfaces"
"""


class DebianBuildError(Exception):
    """The Debian guest could not be built; the message says why."""


@dataclasses.dataclass(frozen=True)
class DebianImage:
    disk: Path              # qcow2 root filesystem (use as a backing file, never write it)
    kernel: Path
    initrd: Path
    append: str = KERNEL_APPEND
    user: str = USER


def cache_parent() -> Path:
    default = Path.home() / ".cache" / "kvmrun"
    env = os.environ.get("KVMRUN_GUEST_CACHE")
    return Path(env).parent if env else default


def sources() -> list[Path]:
    found = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    if not found:
        raise DebianBuildError("no /etc/apt/sources.list.d/*.sources on this host: mmdebstrap "
                               "takes the host's apt sources as its mirrors")
    return found


def _run(*cmd: str, timeout: int = 1800) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DebianBuildError(f"{cmd[0]} not found (apt-get install mmdebstrap e2fsprogs "
                               f"qemu-utils)") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-30:])
        raise DebianBuildError(f"{cmd[0]} failed (exit {proc.returncode}):\n{tail}")


def _inputs(srcs: list[Path]) -> str:
    return json.dumps({"builder": BUILDER_VERSION, "suite": SUITE, "packages": PACKAGES,
                       "customize": CUSTOMIZE, "size": DISK_SIZE,
                       "sources": {str(p): p.read_text() for p in srcs}}, sort_keys=True)


def build_debian() -> DebianImage:
    """Build (or reuse from the cache) the Debian guest."""
    if os.geteuid() != 0:
        raise DebianBuildError("building the Debian guest needs root (mmdebstrap, mkfs.ext4 -d "
                               "with root-owned files)")
    srcs = sources()
    parent = cache_parent()
    parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(_inputs(srcs).encode()).hexdigest()[:16]
    out = parent / f"debian-{digest}"
    image = DebianImage(out / "root.qcow2", out / "vmlinuz", out / "initrd.img")
    with open(parent / ".lock-debian", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one builder at a time
        for stale in parent.glob(".tmp-debian-*"):  # left behind by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        if not (out / "manifest.json").exists():
            with tempfile.TemporaryDirectory(prefix=".tmp-debian-", dir=parent) as tmp:
                _build(Path(tmp), srcs, out, digest)
    return image


def _build(tmp: Path, srcs: list[Path], out: Path, digest: str) -> None:
    tree, stage = tmp / "tree", tmp / "out"
    stage.mkdir()
    _run("mmdebstrap", "--variant=apt", "--mode=root", "--include=" + ",".join(PACKAGES),
         "--customize-hook=" + CUSTOMIZE,
         SUITE, str(tree), *map(str, srcs))
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise DebianBuildError(f"expected one kernel and one initrd in the tree's /boot, found "
                               f"{[p.name for p in kernels + initrds]}")
    shutil.copyfile(kernels[0], stage / "vmlinuz")
    shutil.copyfile(initrds[0], stage / "initrd.img")
    raw = tmp / "root.img"
    _run("mkfs.ext4", "-q", "-L", "debian-root", "-d", str(tree), str(raw), DISK_SIZE)
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(stage / "root.qcow2"))
    raw.unlink()
    manifest = {"hash": digest, "suite": SUITE, "packages": PACKAGES,
                "kernel": kernels[0].name, "append": KERNEL_APPEND, "user": USER,
                "installed": _installed(tree)}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.rename(stage, out)                       # atomic: complete or absent


def _installed(tree: Path) -> dict[str, str]:
    """Versions of the listed packages in the tree (from its dpkg status file)."""
    versions, name = {}, None
    for line in (tree / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(" ", 1)[1]
        elif line.startswith("Version: ") and name in PACKAGES:
            versions[name] = line.split(" ", 1)[1]
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the image paths as JSON")
    args = parser.parse_args(argv)
    try:
        image = build_debian()
    except DebianBuildError as err:
        print(f"debian.py: {err}", file=sys.stderr)
        return 1
    if args.print:
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(image).items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
