"""Disks: format detection (and later creation, overlays, snapshots) on top of qemu-img."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from kvmrun.errors import HostError, ProfileError
from kvmrun.profile import Profile


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if not found:
        raise HostError("qemu-img not found on PATH", hint="install it: apt-get install qemu-utils")
    return found


def image_info(path: str) -> dict:
    try:
        out = subprocess.run([qemu_img(), "info", "--output=json", "-U", path],
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise HostError(f"qemu-img info {path} timed out") from err
    if out.returncode != 0:
        raise HostError(f"qemu-img cannot read {path}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def with_formats(profile: Profile) -> Profile:
    """The profile with every disk's format set, detected with qemu-img where the profile
    left it out. Disks that do not exist keep format None (QEMU will be told to probe)."""
    disks = []
    for i, disk in enumerate(profile.disks):
        if disk.format is None and Path(disk.path).exists():
            try:
                fmt = image_info(disk.path)["format"]
            except HostError as err:
                raise ProfileError(profile.location("disks", i, "path"), err.message) from err
            if fmt not in ("qcow2", "raw"):
                raise ProfileError(profile.location("disks", i, "path"),
                                   f"image format {fmt!r} is not supported (qcow2 or raw)",
                                   hint=f"convert it: qemu-img convert -O qcow2 {disk.path} "
                                        "NEW.qcow2")
            disk = dataclasses.replace(disk, format=fmt)
        disks.append(disk)
    return dataclasses.replace(profile, disks=tuple(disks))
