"""LVM pools against real LVM: a volume group made for the test on a loop device over a
sparse file, always taken apart in `finally` (vgremove, pvremove, losetup -d, the file), so
nothing is left behind even when a test fails.

Root only. Making logical volumes also needs the kernel's device-mapper; where it is missing
(containers, some CI kernels) the guest test skips and the pool test checks that kvmrun says
so plainly and leaves nothing behind. A loop device as a raw disk (no format given, so the
block-device path of format detection) needs only losetup."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

LVM_TOOLS = ("pvcreate", "vgcreate", "vgremove", "pvremove", "lvcreate", "lvremove", "vgs",
             "lvs")
ENV = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def _why_not(*tools: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, LVM)"
    missing = [t for t in ("losetup", *tools) if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (apt-get install lvm2)" if missing else None


def device_mapper() -> bool:
    try:
        return "device-mapper" in Path("/proc/misc").read_text()
    except OSError:
        return False


needs_root_lvm = pytest.mark.skipif(_why_not(*LVM_TOOLS) is not None,
                                    reason=_why_not(*LVM_TOOLS) or "")
needs_dm = pytest.mark.skipif(not device_mapper(), reason="the kernel has no device-mapper "
                                                          "(modprobe dm_mod), so no LVs")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV,
                          stdin=subprocess.DEVNULL, check=check)


@contextlib.contextmanager
def loop_device(base: Path, size: int):
    """A loop device over a sparse file; detached and deleted on the way out."""
    image = base / f"loop-{secrets.token_hex(3)}.img"
    loop = None
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        loop = sh("losetup", "--find", "--show", str(image)).stdout.strip()
        yield loop
    finally:
        if loop:
            sh("losetup", "-d", loop, check=False)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def volume_group(kr, size: int = 256 << 20):
    """A uniquely named VG on its own loop device. On the way out the test's guests are
    killed first (a QEMU holding an LV open would keep vgremove from working)."""
    vg = f"kvmrun-test-{os.getpid()}-{secrets.token_hex(3)}"
    with loop_device(kr.base, size) as loop:
        made = False
        try:
            sh("pvcreate", "-q", "-y", loop)
            sh("vgcreate", "-q", vg, loop)
            made = True
            yield vg
        finally:
            kr.cleanup()
            if made:
                sh("vgremove", "-f", "-y", vg, check=False)
            sh("pvremove", "-ff", "-y", loop, check=False)
    assert sh("vgs", vg, check=False).returncode != 0, f"volume group {vg} was left behind"


def with_snippet(guest, *lines: str) -> dict:
    snippet = base64.b64encode(("\n".join(lines) + "\n").encode()).decode()
    return {"path": str(guest.kernel), "initrd": str(guest.initrd),
            "append": f"console={guest.console} quiet kvmrun.run={snippet}"}


def scratch_disk(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "4M"], check=True)
    return path


def serial(kr, name: str) -> str:
    return (kr.guest_dir(name) / "serial.log").read_text(errors="replace")


def write_marker(marker: str) -> str:
    return (f"echo {marker} | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null; sync; "
            f"echo \"READBACK: $(head -c {len(marker)} /dev/vdb)\"")


@needs_root_lvm
def test_lvm_pool_on_a_real_volume_group(kr):
    """define/info/list against a real VG; a volume made and deleted (or, without
    device-mapper, refused with the reason and nothing left); errors from LVM."""
    code, _, err = kr.run("pool", "define", "nope", "--type", "lvm", "--vg", "kvmrun-no-vg")
    assert code == 1 and "LVM volume group 'kvmrun-no-vg' does not exist" in err
    with volume_group(kr) as vg:
        assert kr.ok("pool", "define", "lv", "--type", "lvm", "--vg", vg).out == \
            f"defined pool lv on LVM volume group {vg}\n"
        info = json.loads(kr.ok("pool", "info", "lv", "--json").out)
        assert (info["type"], info["vg"], info["volumes"]) == ("lvm", vg, [])
        assert 240 << 20 <= info["capacity"] <= 256 << 20 and info["free"] == info["capacity"]
        code, _, err = kr.run("disk", "create", "--pool", "lv", "big", "--size", "1G")
        assert code == 1 and "not enough free space" in err
        result = kr.run("disk", "create", "--pool", "lv", "vol1", "--size", "10M")
        lvs = json.loads(sh("lvs", "--reportformat", "json", "-o", "lv_name", vg).stdout)
        names = [lv["lv_name"] for lv in lvs["report"][0]["lv"]]
        if not device_mapper():
            assert result.code == 3 and "device-mapper is not available" in result.err
            assert names == []                                   # nothing left behind
        else:
            assert result.out == f"created /dev/{vg}/vol1 (raw, 12 MiB)\n", result
            assert names == ["vol1"] and Path(f"/dev/{vg}/vol1").is_block_device()
            code, _, err = kr.run("disk", "create", "--pool", "lv", "vol1", "--size", "4M")
            assert code == 1 and "a logical volume of that name exists already" in err
            assert kr.ok("disk", "delete", "--pool", "lv", "vol1").out == \
                f"deleted /dev/{vg}/vol1\n"
        rows = json.loads(kr.ok("pool", "list", "--json").out)
        assert [(r["name"], r["type"], r["available"]) for r in rows] == [("lv", "lvm", True)]
        kr.ok("pool", "undefine", "lv")
    assert json.loads(kr.ok("pool", "list", "--json").out) == []


@pytest.mark.qemu
@pytest.mark.slow
@needs_root_lvm
@needs_dm
def test_lvm_volume_as_a_guest_disk(kr, tiny_guest):
    """A logical volume as the tiny guest's second virtio disk: the guest writes a marker,
    the host reads it back from the LV; deleting the volume is refused while the guest
    runs."""
    marker = "KVMRUN-LV-MARKER"
    with volume_group(kr) as vg:
        kr.ok("pool", "define", "lv", "--type", "lvm", "--vg", vg)
        kr.ok("disk", "create", "--pool", "lv", "data", "--size", "16M")
        profile = kr.profile("lvm", tiny_guest, kernel=with_snippet(tiny_guest,
                                                                      write_marker(marker)),
                             disks=[{"path": str(scratch_disk(kr.base / "boot.img"))},
                                    {"pool": "lv", "volume": "data"}])
        assert f"file=/dev/{vg}/data,format=raw" in kr.ok("cmdline", profile).out
        kr.start(profile)
        assert f"READBACK: {marker}" in serial(kr, "lvm")
        code, _, err = kr.run("disk", "delete", "--pool", "lv", "data")
        assert code == 4 and "in use by running guest 'lvm' (disk1)" in err
        assert "in use by lvm" in kr.ok("pool", "info", "lv").out
        kr.ok("stop", "lvm")
        head = sh("dd", f"if=/dev/{vg}/data", "bs=512", "count=1", "status=none").stdout
        assert head.startswith(marker + "\n")
        assert kr.ok("disk", "delete", "--pool", "lv", "data").out == \
            f"deleted /dev/{vg}/data\n"
        assert not Path(f"/dev/{vg}/data").exists()
        kr.ok("pool", "undefine", "lv")


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_block_device_as_a_raw_disk(kr, tiny_guest):
    """A block device named by path, without format: it is taken as raw (not probed), the
    guest writes to it and the host reads the write back; a pool volume in use cannot be
    deleted."""
    marker = "KVMRUN-BLOCK-MARKER"
    with loop_device(kr.base, 8 << 20) as loop:
        try:
            kr.ok("pool", "define", "imgs", kr.base / "images")
            kr.ok("disk", "create", "--pool", "imgs", "boot.img", "-s", "4M", "-f", "raw")
            profile = kr.profile("blk", tiny_guest, kernel=with_snippet(tiny_guest,
                                                                          write_marker(marker)),
                                 disks=[{"pool": "imgs", "volume": "boot.img"},
                                        {"path": loop}])
            assert f"file={loop},format=raw" in kr.ok("cmdline", profile).out
            kr.start(profile)
            assert f"READBACK: {marker}" in serial(kr, "blk")
            code, _, err = kr.run("disk", "delete", "--pool", "imgs", "boot.img")
            assert code == 4 and "in use by running guest 'blk' (disk0)" in err
            kr.ok("stop", "blk")
            head = sh("dd", f"if={loop}", "bs=512", "count=1", "status=none").stdout
            assert head.startswith(marker + "\n")
            kr.ok("disk", "delete", "--pool", "imgs", "boot.img")
            assert not (kr.base / "images" / "boot.img").exists()
        finally:
            kr.cleanup()              # no QEMU may hold the loop device when it is detached
