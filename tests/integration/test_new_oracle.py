"""QEMU is the oracle of `kvmrun new`: the profiles it makes for a spread of osinfo-db presets
and install modes (virtio or SATA disks, e1000e/e1000 NICs, UEFI, VNC with a tablet) are
started paused by the real QEMU and checked over QMP against what they ask for."""

from __future__ import annotations

import pytest
import yaml

import qemu_oracle as oracle
from kvmrun import arch as archmod
from kvmrun.storage import disks as storage
from kvmrun.ops import new, osinfo

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not osinfo.available(), reason="osinfo-db not installed")]

CASES = [("win11", dict(cdrom="install.iso")), ("winxp", dict(import_disk="old.qcow2")),
         ("debian11", dict(cdrom="install.iso", uefi=True)), ("fedora36", dict(pxe=True)),
         ("alpinelinux3.16", dict(kernel="vmlinuz", initrd="initrd.img", disk="2G")),
         (None, dict(disk="none", network="none"))]


@pytest.mark.parametrize("os_id, kwargs", CASES, ids=[c[0] or "generic" for c in CASES])
def test_qemu_builds_what_kvmrun_new_asks(os_id, kwargs, tmp_path, monkeypatch):
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")
    work = tmp_path / "work"
    (work / "files").mkdir(parents=True)
    monkeypatch.setenv("KVMRUN_DATA_DIR", str(work / "data"))
    monkeypatch.chdir(work / "files")            # new_profile's paths land in the scratch dir
    data = new.new_profile("vm1", os_id=os_id, check_files=False, **kwargs)
    data["memory"] = 256                 # paused guests: the preset's 4 GiB is not needed
    source = tmp_path / "src" / "vm1.yaml"
    source.parent.mkdir()
    source.write_text(yaml.safe_dump(data, sort_keys=False))
    profile = oracle.prepare(source, work)
    new.make_dirs(data)
    storage.ensure_disks(profile)                # the new disk, made as `kvmrun start` makes it
    oracle.check_profile(profile, work)
