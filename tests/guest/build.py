#!/usr/bin/env python3
"""Build a tiny Linux test guest (kernel + initramfs) from Debian packages.

The kernel and a static busybox are taken from the Debian archive for the
guest architecture (``apt-get download`` + ``dpkg-deb -x``; nothing is
installed on the host).  The initramfs holds busybox, a handful of kernel
modules and an ``/init`` script that configures the guest from the kernel
command line, prints ``KVMRUN-GUEST-READY`` and then runs a shell on the
serial console.  See README.md next to this file.

Usage:  python3 tests/guest/build.py --arch x86_64 [--variant default|noacpi] [--print]
API:    build_guest(arch="x86_64", variant="default") -> GuestImage
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

BUILDER_VERSION = 1  # bump when the build logic changes (part of the cache hash)
READY_MARKER = "KVMRUN-GUEST-READY"
VARIANTS = ("default", "noacpi")


class GuestBuildError(Exception):
    """The guest could not be built; the message says why."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    console: str
    ready_marker: str = READY_MARKER


@dataclasses.dataclass(frozen=True)
class Arch:
    deb_arch: str  # Debian architecture name
    kernel_meta: str  # meta package depending on the versioned kernel package
    console: str
    modules: tuple[str, ...]  # arch specific extras (see COMMON_MODULES)


# Modules loaded at boot, in this order (their dependencies are added first).
# Anything built into the kernel, or not shipped for this arch, is skipped.
COMMON_MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console",
    "virtio_rng", "virtio_balloon", "virtio_scsi", "sd_mod", "sr_mod", "cdrom",
    "isofs", "9pnet_virtio", "9p", "crc32c_generic", "ext4", "ahci", "evdev",
)
ARCHES = {
    "x86_64": Arch("amd64", "linux-image-amd64", "ttyS0", ("ata_piix", "e1000", "button")),
    # QEMU virt (DT boot): power button is gpio-keys on a PL061 GPIO controller.
    "aarch64": Arch("arm64", "linux-image-arm64", "ttyAMA0", ("gpio_pl061", "gpio_keys")),
    "arm": Arch("armhf", "linux-image-armmp-lpae", "ttyAMA0", ("gpio_pl061", "gpio_keys")),
}

INIT_SCRIPT = r"""#!/bin/busybox sh
# kvmrun tiny test guest /init (variant: @VARIANT@)
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /var/log /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname kvmrun-guest

while read -r mod; do
    insmod "/lib/modules/$mod" 2>/dev/null || echo "kvmrun-guest: insmod $mod failed"
done < /etc/modules.list

ip link set lo up
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        kvmrun.ip=*)   IP="${arg#kvmrun.ip=}" ;;
        kvmrun.gw=*)   GW="${arg#kvmrun.gw=}" ;;
        kvmrun.dhcp=1) DHCP=1 ;;
        kvmrun.run=*)  RUN="${arg#kvmrun.run=}" ;;
    esac
done
if [ -n "$IP$DHCP" ]; then
    i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done
    ip link set eth0 up
fi
if [ -n "$IP" ]; then
    ip addr add "$IP" dev eth0
    [ -n "$GW" ] && ip route add default via "$GW"
fi
[ "$DHCP" = 1 ] && udhcpc -i eth0 -s /etc/udhcpc.script -b -t 10 -T 1 -A 1 >/dev/null 2>&1

if [ "@VARIANT@" = default ]; then
    # ACPI power button (x86) and gpio-keys KEY_POWER (arm virt) both arrive
    # as input events; acpid maps KEY_POWER to "PWRF" -> /etc/acpi/PWRF/00000080.
    acpid -c /etc/acpi -a /etc/acpid.conf -l /run/acpid.log
fi

if [ -n "$RUN" ]; then
    echo "$RUN" | base64 -d > /run/kvmrun-run.sh && sh /run/kvmrun-run.sh
fi

printf '\n@READY@\n'  # own line, even after firmware/escape output
while true; do
    setsid cttyhack sh
    sleep 1
done
"""

EXTRA_FILES = {
    "etc/udhcpc.script": (0o755, r"""#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf ;;
esac
"""),
    "etc/acpid.conf": (0o644, "PWRF PWRF/00000080\n"),
    "etc/acpi/PWRF/00000080": (0o755, "#!/bin/sh\necho 'kvmrun-guest: power button, powering off' >/dev/console\npoweroff -f\n"),
    "etc/passwd": (0o644, "root:x:0:0:root:/root:/bin/sh\n"),
    "etc/group": (0o644, "root:x:0:\n"),
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "kvmrun" / "guest"
    return Path(os.environ.get("KVMRUN_GUEST_CACHE") or default)


def run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} not found (a Debian host with apt/dpkg is needed)") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


# --- Debian packages ---------------------------------------------------------

def apt_show(*pkgs: str) -> dict[str, dict[str, str]]:
    """{name: fields} of the candidate versions of pkgs ("name:arch"); unknown ones are absent."""
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *pkgs],
                              capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestBuildError("apt-cache not found (a Debian host with apt/dpkg is needed)") from exc
    found = {}
    for stanza in proc.stdout.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if line[:1] not in (" ", "") and ": " in line)
        if "Package" in fields:
            found[fields["Package"]] = fields
    return found


def apt_lists_state() -> str:
    """Changes whenever apt's package lists change (apt-get update, new architecture)."""
    lists = Path("/var/lib/apt/lists")
    stats = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                   for p in lists.glob("*") if p.is_file())
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def resolve_packages(arch: Arch, root: Path) -> dict[str, str]:
    """{package name: version} of the concrete kernel package and busybox-static.

    apt-cache is slow (seconds), so results are remembered per state of apt's lists.
    """
    memo_file = root / "resolved.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    state = apt_lists_state()
    key = f"{arch.deb_arch}:{arch.kernel_meta}:{state}"
    if key not in memo:
        memo = {k: v for k, v in memo.items() if k.endswith(state)}  # drop stale entries
        memo[key] = _resolve_packages(arch)
        memo_file.write_text(json.dumps(memo, indent=2) + "\n")
    return memo[key]


def _resolve_packages(arch: Arch) -> dict[str, str]:
    wanted = [f"{arch.kernel_meta}:{arch.deb_arch}", f"busybox-static:{arch.deb_arch}"]
    found = apt_show(*wanted)
    if len(found) < 2:
        add_apt_arch(arch.deb_arch)
        found = apt_show(*wanted)
    if len(found) < 2:
        raise GuestBuildError(f"packages {' '.join(wanted)} not available from apt")
    depends = found[arch.kernel_meta].get("Depends", "").split(",")
    kernel = next((d.split()[0] for d in depends if d.strip().startswith("linux-image-")), None)
    kernel_fields = apt_show(f"{kernel}:{arch.deb_arch}").get(kernel) if kernel else None
    if kernel_fields is None:
        raise GuestBuildError(f"cannot resolve the kernel package {arch.kernel_meta} depends on")
    return {kernel: kernel_fields["Version"], "busybox-static": found["busybox-static"]["Version"]}


def add_apt_arch(deb_arch: str) -> None:
    """Make apt know packages of deb_arch (dpkg --add-architecture + apt-get update)."""
    known = {run("dpkg", "--print-architecture").strip(),
             *run("dpkg", "--print-foreign-architectures").split()}
    if os.geteuid() != 0:
        hint = "" if deb_arch in known else f"dpkg --add-architecture {deb_arch} && "
        raise GuestBuildError(
            f"apt does not know the needed {deb_arch} packages; run the builder as root "
            f"once, or run '{hint}apt-get update' as root yourself")
    if deb_arch not in known:
        run("dpkg", "--add-architecture", deb_arch)
    subprocess.run(["apt-get", "update", "-q"], capture_output=True)  # partial failures are ok


def fetch_deb(name: str, version: str, deb_arch: str, debs: Path) -> Path:
    deb = debs / f"{name}_{version.replace(':', '%3a')}_{deb_arch}.deb"
    if not deb.exists():
        debs.mkdir(parents=True, exist_ok=True)
        run("apt-get", "download", "-q", f"{name}:{deb_arch}={version}", cwd=debs)
        if not deb.exists():
            raise GuestBuildError(f"apt-get download did not produce {deb}")
    return deb


# --- kernel modules ----------------------------------------------------------

def modinfo(ko: bytes) -> dict[str, str]:
    """key=value pairs of the .modinfo section of a kernel module (any ELF class/endianness)."""
    if ko[:4] != b"\x7fELF":
        raise GuestBuildError("not an ELF kernel module")
    is64, end = ko[4] == 2, "<" if ko[5] == 1 else ">"
    shoff = struct.unpack_from(end + ("Q" if is64 else "I"), ko, 0x28 if is64 else 0x20)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ko, 0x3A if is64 else 0x2E)
    shdr = end + ("IIQQQQ" if is64 else "IIIIII")  # name, type, flags, addr, offset, size

    def section(i: int) -> tuple[int, bytes]:
        name, _, _, _, offset, size = struct.unpack_from(shdr, ko, shoff + i * shentsize)
        return name, ko[offset:offset + size]

    strtab = section(shstrndx)[1]
    for i in range(shnum):
        name, data = section(i)
        if strtab[name:strtab.index(b"\0", name)] == b".modinfo":
            pairs = (item.decode(errors="replace").partition("=")
                     for item in data.split(b"\0") if b"=" in item)
            return {key: value for key, _, value in pairs}
    return {}


def select_modules(moddir: Path, wanted: list[str]) -> tuple[list[Path], list[str], list[str]]:
    """Resolve wanted module names to .ko files, dependencies first.

    Returns (ordered module files, builtin names, names not available).
    """
    def norm(name: str) -> str:
        return name.replace("-", "_")

    files = {norm(p.name.split(".ko")[0]): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = {norm(Path(line).name.split(".ko")[0])
               for line in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in files:
            return
        seen.add(name)
        for dep in filter(None, modinfo(read_ko(files[name])).get("depends", "").split(",")):
            if norm(dep) not in files and norm(dep) not in builtin:
                raise GuestBuildError(f"module {name} needs {dep}, which is missing")
            visit(norm(dep))
        order.append(files[name])

    for name in map(norm, wanted):
        visit(name)
    return (order, [n for n in wanted if norm(n) in builtin],
            [n for n in wanted if norm(n) not in files and norm(n) not in builtin])


def read_ko(path: Path) -> bytes:
    """Module contents, uncompressed (busybox insmod only loads plain .ko files)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise GuestBuildError(f"zstd compressed modules are not supported: {path}")
    return data


# --- initramfs ---------------------------------------------------------------

class Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0)
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.out.write(name.encode() + b"\0")
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self) -> None:
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def dir(self, name: str) -> None:
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return gzip.compress(self.out.getvalue(), compresslevel=6, mtime=0)


def make_initrd(busybox: bytes, modules: list[tuple[str, bytes]], init: str) -> bytes:
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules",
              "proc", "sys", "run", "tmp"):
        cpio.dir(d)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init.encode(), 0o755)
    for path, (perm, text) in EXTRA_FILES.items():
        cpio.file(path, text.encode(), perm)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}", data)
    cpio.file("etc/modules.list", "".join(f"{name}\n" for name, _ in modules).encode())
    return cpio.finish()


# --- build -------------------------------------------------------------------

def build_guest(arch: str = "x86_64", variant: str = "default") -> GuestImage:
    """Build (or reuse from the cache) the test guest for arch/variant."""
    if arch not in ARCHES:
        raise GuestBuildError(f"unknown arch {arch!r}; choose from {', '.join(ARCHES)}")
    if variant not in VARIANTS:
        raise GuestBuildError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    spec = ARCHES[arch]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time per cache
        for stale in root.glob(".tmp-*"):  # left behind by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        packages = resolve_packages(spec, root)
        init = INIT_SCRIPT.replace("@VARIANT@", variant).replace("@READY@", READY_MARKER)
        wanted = [*COMMON_MODULES, *spec.modules]
        inputs = json.dumps({"builder": BUILDER_VERSION, "arch": arch, "variant": variant,
                             "packages": packages, "init": init, "files": EXTRA_FILES,
                             "modules": wanted}, sort_keys=True)
        digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
        out = root / f"{arch}-{variant}-{digest}"
        image = GuestImage(out / "vmlinuz", out / "initrd.img", spec.console)
        if not (out / "manifest.json").exists():
            debs = {name: fetch_deb(name, version, spec.deb_arch, root / "debs")
                    for name, version in packages.items()}
            with tempfile.TemporaryDirectory(prefix=".tmp-", dir=root) as tmp:
                _build(Path(tmp), debs, init, wanted, out, json.loads(inputs), digest)
    return image


def _build(tmp: Path, debs: dict[str, Path], init: str, wanted: list[str],
           out: Path, inputs: dict, digest: str) -> None:
    kernel_pkg = next(name for name in debs if name.startswith("linux-image-"))
    for name, deb in debs.items():
        run("dpkg-deb", "-x", str(deb), str(tmp / name))
    kroot = tmp / kernel_pkg
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    moddirs = sorted((kroot / "lib" / "modules").glob("*"))
    if len(vmlinuz) != 1 or len(moddirs) != 1:
        raise GuestBuildError(f"unexpected layout of {debs[kernel_pkg].name}")
    order, builtin, missing = select_modules(moddirs[0], wanted)
    modules = [(p.name.split(".ko")[0] + ".ko", read_ko(p)) for p in order]
    busybox = (tmp / "busybox-static" / "bin" / "busybox").read_bytes()

    stage = tmp / "out"
    stage.mkdir()
    shutil.copyfile(vmlinuz[0], stage / "vmlinuz")
    (stage / "initrd.img").write_bytes(make_initrd(busybox, modules, init))
    manifest = {**inputs, "hash": digest, "kernel_release": moddirs[0].name,
                "loaded_modules": [name for name, _ in modules],
                "builtin_modules": builtin, "unavailable_modules": missing}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.rename(stage, out)  # atomic: a cache entry is either complete or absent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="x86_64", choices=sorted(ARCHES))
    parser.add_argument("--variant", default="default", choices=VARIANTS)
    parser.add_argument("--print", action="store_true", help="print the GuestImage as JSON")
    parser.add_argument("--link", action="store_true",
                        help="point build/guest/ARCH at the guest (the example profiles in "
                             "profiles/ use it)")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.arch, args.variant)
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.link:
        link = Path(__file__).resolve().parents[2] / "build" / "guest" / args.arch
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{args.arch}.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(image.kernel.parent)
        os.replace(tmp, link)
    if args.print:
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(image).items()}, indent=2))
    else:
        print(image.kernel.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
