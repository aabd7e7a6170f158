"""Storage against real QEMU (TCG) and the tiny guest: throwaway overlays (the base image is
never written, no overlay outlives the guest, even after kill -9), `run --rm`, disks created
on first start and resized live, the cloud-init seed and a virtio-9p share as the guest sees
them, and snapshots of a running guest.

The guest runs a shell snippet from its kernel command line (`kvmrun.run=BASE64`) before it
prints its ready marker; what it prints lands in the run directory's serial.log."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_snippet(guest, *lines: str) -> dict:
    snippet = base64.b64encode(("\n".join(lines) + "\n").encode()).decode()
    return {"path": str(guest.kernel), "initrd": str(guest.initrd),
            "append": f"console={guest.console} quiet kvmrun.run={snippet}"}


def serial(kr, name: str) -> str:
    return (kr.guest_dir(name) / "serial.log").read_text(errors="replace")


def overlays(kr, name: str) -> list[str]:
    directory = kr.guest_dir(name)
    return sorted(p.name for p in directory.glob("overlay-*")) if directory.exists() else []


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_disk(path: Path, mib: int = 4) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), f"{mib}M"], check=True)
    return path


WRITE_MARKER = ("echo KVMRUN-MARKER | dd of=/dev/vda bs=512 count=1 conv=sync 2>/dev/null; "
                "sync; echo \"READBACK: $(head -c 13 /dev/vda)\"")


def test_ephemeral_disk_never_writes_its_base(kr, tiny_guest):
    base = raw_disk(kr.base / "base.img")
    data = kr.base / "data.qcow2"
    kr.ok("disk", "create", data, "--size", "16M")
    before = sha256(base)
    profile = kr.profile("eph", tiny_guest, kernel=with_snippet(tiny_guest, WRITE_MARKER),
                         disks=[{"path": str(base), "ephemeral": True},
                                {"path": str(data)}])
    kr.start(profile)
    assert "READBACK: KVMRUN-MARKER" in serial(kr, "eph")      # the guest saw its write
    assert overlays(kr, "eph") == ["overlay-disk0.qcow2"]
    info = json.loads(kr.ok("disk", "info", kr.guest_dir("eph") / "overlay-disk0.qcow2",
                            "--json").out)
    assert info["backing_file"] == str(base) and info["backing_format"] == "raw"
    status = kr.ok("status", "eph").out
    assert "disk0 is ephemeral: its writes go to a throwaway overlay" in status

    # a snapshot of the running guest: savevm on its qcow2 disks (overlay and data)
    assert kr.ok("snapshot", "create", "eph", "s1").out == \
        "created snapshot s1 of eph (running: with VM state)\n"
    rows = json.loads(kr.ok("snapshot", "list", "eph", "--json").out)
    assert [r["name"] for r in rows] == ["s1"] and rows[0]["vm_state_size"] > 0
    assert sorted(rows[0]["disks"]) == sorted([str(data), str(kr.guest_dir("eph") /
                                                               "overlay-disk0.qcow2")])
    kr.ok("snapshot", "revert", "eph", "s1")
    kr.ok("snapshot", "delete", "eph", "s1")
    assert json.loads(kr.ok("snapshot", "list", "eph", "--json").out) == []

    # --disk-only: both disks in one QMP transaction, no VM state; a live revert is refused
    assert kr.ok("snapshot", "create", "eph", "d1", "--disk-only").out == \
        "created snapshot d1 of eph (running: disks only)\n"
    rows = json.loads(kr.ok("snapshot", "list", "eph", "--json").out)
    assert [(r["name"], r["vm_state_size"]) for r in rows] == [("d1", 0)]
    assert sorted(rows[0]["disks"]) == sorted([str(data), str(kr.guest_dir("eph") /
                                                               "overlay-disk0.qcow2")])
    refused = kr.run("snapshot", "revert", "eph", "d1")
    assert refused.code == 4, refused
    assert "d1 is a disk-only snapshot (no RAM state): it cannot be reverted while eph " \
        "runs" in refused.err and "kvmrun stop eph" in refused.err
    kr.ok("snapshot", "delete", "eph", "d1")
    assert json.loads(kr.ok("snapshot", "list", "eph", "--json").out) == []

    kr.ok("stop", "eph")
    assert overlays(kr, "eph") == []
    assert sha256(base) == before
    assert json.loads(kr.ok("disk", "info", data, "--json").out)["snapshots"] == []


def test_overlay_collected_after_kill9(kr, tiny_guest):
    base = raw_disk(kr.base / "base.img")
    before = sha256(base)
    profile = kr.profile("crash", tiny_guest, kernel=with_snippet(tiny_guest, WRITE_MARKER),
                         disks=[{"path": str(base)}])
    started = json.loads(kr.ok("start", profile, "--ephemeral", "--json").out)
    assert overlays(kr, "crash") == ["overlay-disk0.qcow2"]
    assert "READBACK: KVMRUN-MARKER" in serial(kr, "crash")
    # a second throwaway guest on the same base is fine; a guest writing to it is not
    twin = kr.profile("twin", tiny_guest, disks=[{"path": str(base), "ephemeral": True}])
    kr.ok("start", twin, "--no-wait-ready")
    writer = kr.profile("writer", tiny_guest, disks=[{"path": str(base)}])
    refused = kr.run("start", writer)
    assert refused.code == 4 and "is in use by running guest" in refused.err
    kr.ok("kill", "twin")
    assert overlays(kr, "twin") == []
    kr.kill9(started["supervisor_pid"])
    kr.kill9(started["pid"])
    assert overlays(kr, "crash") == ["overlay-disk0.qcow2"]  # nobody cleaned up yet
    assert kr.status("crash")["state"] == "crashed"          # the next look collects it
    assert overlays(kr, "crash") == []
    assert sha256(base) == before
    # and a disk of a dead guest is free again
    kr.ok("disk", "resize", base, "+4M")


def test_run_rm_leaves_nothing(kr, tiny_guest):
    base = raw_disk(kr.base / "base.img")
    before = sha256(base)
    profile = kr.profile("rm", tiny_guest,
                         kernel=with_snippet(tiny_guest, WRITE_MARKER, "poweroff -f"),
                         disks=[{"path": str(base)}], ready={"timeout": 180})
    result = kr.run("run", profile, "--rm")
    assert result.code == 0, result
    assert not kr.guest_dir("rm").exists()
    assert sha256(base) == before


def test_seed_share_created_disk_and_live_resize(kr, tiny_guest):
    if shutil.which("isoinfo") is None:
        pytest.skip("isoinfo (genisoimage) is not installed")
    shared = kr.base / "src"
    shared.mkdir()
    (shared / "hello.txt").write_text("written on the host\n")
    disk = kr.base / "made.qcow2"
    profile = kr.profile("seed", tiny_guest, kernel=with_snippet(
        tiny_guest,
        "mkdir -p /mnt/src /mnt/cd",
        "mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src && "
        "echo \"SHARE: $(cat /mnt/src/hello.txt)\"",
        "mount -t iso9660 -o ro /dev/vdb /mnt/cd && "        # the seed: a virtio disk
        "echo \"SEED: $(grep local-hostname /mnt/cd/meta-data)\"",
        "echo \"DISK: $(cat /sys/block/vda/size)\""),
        disks=[{"path": str(disk), "size": "64M"}],
        shares=[{"path": "src", "tag": "src", "readonly": True}],
        cloud_init={"hostname": "seedbox", "user_data": {"runcmd": [["echo", "hi"]]}},
        network=[{"forward": [f"{free_port()}:22"]}])
    kr.start(profile)
    log = serial(kr, "seed")
    assert "SHARE: written on the host" in log
    assert "SEED: local-hostname: seedbox" in log
    assert f"DISK: {64 * 2048}" in log                        # 512-byte sectors
    iso = kr.guest_dir("seed") / "cidata.iso"
    assert "Volume id: cidata" in subprocess.run(["isoinfo", "-d", "-i", str(iso)],
                                                 capture_output=True, text=True).stdout
    user = subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", "/user-data"],
                          capture_output=True, text=True).stdout
    assert user.startswith("#cloud-config\n") and "hostname: seedbox" in user
    status = kr.ok("status", "seed").out
    assert ("share    " + str(shared) + " as src (9p, ro); in the guest: mkdir -p /mnt/src && "
            "mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src") in status

    port = json.loads(kr.ok("status", "seed", "--json").out)["forwards"][0].split(":")[2]
    port = port.split("-")[0]
    assert kr.ok("ssh", "seed", "--print", "-l", "root", "--", "cat", "/etc/hostname").out == (
        f"ssh -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o LogLevel=ERROR -o ConnectTimeout=10 -l root 127.0.0.1 -- cat /etc/hostname\n")

    # resize while running: live, through QMP block_resize
    resized = kr.ok("disk", "resize", disk, "+64M")
    assert resized.out == f"resized {disk} live in seed: 64 MiB -> 128 MiB\n"
    blocks = json.loads(kr.ok("qmp", "seed", "query-block").out)
    vda = next(b for b in blocks if b["device"] == "drive-disk0")
    assert vda["inserted"]["image"]["virtual-size"] == 128 << 20
    info = json.loads(kr.ok("disk", "info", disk, "--json").out)
    assert info["in_use_by"] == "seed"
    wrong = kr.run("disk", "resize", disk, "+1M", "--live", "other")
    assert wrong.code == 4 and "other is not running" in wrong.err

    # another guest may not open the same disk for writing
    other = kr.profile("other", tiny_guest, disks=[{"path": str(disk)}])
    refused = kr.run("start", other)
    assert refused.code == 4 and f"disk {disk} is in use by running guest 'seed'" in refused.err
    kr.ok("stop", "seed")
    assert disk.exists() and iso.exists()                     # kept with the VM
    assert json.loads(kr.ok("disk", "info", disk, "--json").out)["virtual_size"] == 128 << 20


def test_failed_start_removes_the_disk_it_made(kr, tiny_guest):
    disk = kr.base / "new.qcow2"
    profile = kr.profile("bad", tiny_guest, disks=[{"path": str(disk), "size": "16M"}],
                         qemu_args=["-device", "no-such-device"])
    result = kr.run("start", profile)
    assert result.code == 7 and "no-such-device" in result.err
    assert not disk.exists()
    assert not kr.guest_dir("bad").exists()
