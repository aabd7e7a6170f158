"""The real Debian 12 cloud guest (tests/guest/debian.py) as a session fixture.

`debian_guest`   the DebianImage (qcow2 root disk, kernel, initrd), built once and cached in
                 ~/.cache/kvmrun/debian-<hash>; tests put a qcow2 overlay of their own on it
                 (`disks: [{path: OVERLAY, backing: IMAGE}]`) and never write the image itself.

Skipped, with the reason, on a host that cannot build it (not root, no mmdebstrap, no QEMU).
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def debian_guest():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest needs root (mmdebstrap)")
    from tests.guest.debian import DebianBuildError, build_debian
    try:
        return build_debian()
    except DebianBuildError as err:
        pytest.skip(f"cannot build the Debian guest: {err}")
