#!/usr/bin/env python3
"""Build a UEFI Secure Boot test disk: an EFI system partition with Debian's signed boot chain.

The chain is the one a Debian 12 installation boots, taken from the archive with
``apt-get download`` (nothing is installed on the host):

    EFI/BOOT/BOOTX64.EFI   shim-signed's shimx64.efi.signed (Microsoft's signature)
    EFI/BOOT/grubx64.efi   grub-efi-amd64-signed's grubx64.efi.signed (Debian's), which shim
                           loads from its own directory; a monolithic image whose prefix is
                           /EFI/debian on the device it was loaded from, so it reads
    EFI/debian/grub.cfg    boots /vmlinuz with console=ttyS0 and /initrd.img
    vmlinuz, initrd.img    the tiny guest's (tests/guest/build.py): linux-image-amd64's
                           signed kernel and the busybox initramfs

The image is a bare FAT filesystem (no partition table: OVMF mounts it as a whole-disk
filesystem and boots its EFI/BOOT/BOOTX64.EFI), made with mkfs.vfat and filled with mtools.
With ``signed=False`` the kernel's Authenticode signature is stripped (the certificate table
emptied and cut off, what ``sbattach --remove`` does), so grub's shim verifier refuses it.

API:    build_esp(guest, signed=True) -> Path     cached next to the tiny guest
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from tests.guest.build import (GuestBuildError, GuestImage, apt_show, cache_root, fetch_deb,
                               run)

ESP_VERSION = 1                     # bump when the layout changes (part of the cache key)
SIZE_MIB = 32
PACKAGES = {"shim-signed": "usr/lib/shim/shimx64.efi.signed",
            "grub-efi-amd64-signed": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"}
GRUB_CFG = """set timeout=0
echo "kvmrun-esp: grub loads /vmlinuz"
linux /vmlinuz console=ttyS0
initrd /initrd.img
boot
"""


def strip_signature(image: bytes) -> bytes:
    """A PE image without its Authenticode signature: the certificate table (data directory
    4) emptied and the signature at the end of the file cut off."""
    if image[:2] != b"MZ":
        raise GuestBuildError("not a PE image (no MZ header)")
    pe = struct.unpack_from("<I", image, 0x3C)[0]
    if image[pe:pe + 4] != b"PE\0\0":
        raise GuestBuildError("not a PE image (no PE signature)")
    optional = pe + 24
    magic = struct.unpack_from("<H", image, optional)[0]
    directory = optional + (112 if magic == 0x20B else 96) + 4 * 8    # PE32+ or PE32
    offset, size = struct.unpack_from("<II", image, directory)
    if size == 0:
        raise GuestBuildError("the image carries no signature to strip")
    out = bytearray(image[:offset] if offset + size == len(image) else image)
    struct.pack_into("<II", out, directory, 0, 0)
    return bytes(out)


def _versions() -> dict[str, str]:
    found = apt_show(*(f"{name}:amd64" for name in PACKAGES))
    missing = [name for name in PACKAGES if name not in found]
    if missing:
        raise GuestBuildError(f"packages {' '.join(missing)} not available from apt")
    return {name: found[name]["Version"] for name in PACKAGES}


def build_esp(guest: GuestImage, signed: bool = True) -> Path:
    """The ESP image for the tiny guest's kernel (built once per inputs, then cached)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        versions = _versions()
        inputs = json.dumps({"esp": ESP_VERSION, "packages": versions, "grub_cfg": GRUB_CFG,
                             "guest": str(guest.kernel.parent), "signed": signed},
                            sort_keys=True)
        digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
        out = root / f"esp-{'signed' if signed else 'unsigned'}-{digest}.img"
        if out.exists():
            return out
        debs = {name: fetch_deb(name, version, "amd64", root / "debs")
                for name, version in versions.items()}
        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=root) as tmp:
            _build(Path(tmp), debs, guest, signed, out)
    return out


def _build(tmp: Path, debs: dict[str, Path], guest: GuestImage, signed: bool,
           out: Path) -> None:
    for name, deb in debs.items():
        run("dpkg-deb", "-x", str(deb), str(tmp / name))
    kernel = guest.kernel.read_bytes()
    files = {
        "EFI/BOOT/BOOTX64.EFI": tmp / "shim-signed" / PACKAGES["shim-signed"],
        "EFI/BOOT/grubx64.efi": tmp / "grub-efi-amd64-signed" / PACKAGES["grub-efi-amd64-signed"],
        "EFI/debian/grub.cfg": tmp / "grub.cfg",
        "vmlinuz": tmp / "vmlinuz",
        "initrd.img": guest.initrd,
    }
    (tmp / "grub.cfg").write_text(GRUB_CFG)
    (tmp / "vmlinuz").write_bytes(kernel if signed else strip_signature(kernel))
    image = tmp / "esp.img"
    with open(image, "wb") as f:
        f.truncate(SIZE_MIB << 20)
    if shutil.which("mkfs.vfat") is None and not os.path.exists("/sbin/mkfs.vfat"):
        raise GuestBuildError("mkfs.vfat not found (apt-get install dosfstools)")
    if shutil.which("mcopy") is None:
        raise GuestBuildError("mcopy not found (apt-get install mtools)")
    run(shutil.which("mkfs.vfat") or "/sbin/mkfs.vfat", "-n", "KVMRUN-ESP", str(image))
    for folder in ("::EFI", "::EFI/BOOT", "::EFI/debian"):
        run("mmd", "-i", str(image), folder)
    for target, source in files.items():
        run("mcopy", "-i", str(image), str(source), f"::{target}")
    os.rename(image, out)         # atomic: a cached image is complete or absent
