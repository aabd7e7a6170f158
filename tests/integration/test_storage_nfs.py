"""NFS pools against a real userspace NFS server (nfs-ganesha + rpcbind, tests/integration/
nfs_server.py) with the real clients: QEMU's NFS block driver, qemu-img and libnfs.

The server lives in private namespaces; every kvmrun command of these tests (and so the
supervisor and QEMU it starts) runs in the server's network namespace through `nsenter --net`,
where the server is 127.0.0.1. The host reads what the guest wrote straight from the
export's directory. The kernel access path cannot work here (no kernel NFS client); its
command lines are unit-tested in tests/unit/test_storage_nfs.py."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from kvmrun.guest.qmp import query
from kvmrun.storage import nfs as storage_nfs
from tests.integration.nfs_server import NfsServer, why_not

pytestmark = pytest.mark.skipif(why_not() is not None, reason=why_not() or "")
URL = "nfs://127.0.0.1/export"


@contextlib.contextmanager
def serving(kr, squash: str = "No_Root_Squash"):
    """A running NFS server; kr's CLI calls run in its network namespace."""
    base = Path(tempfile.mkdtemp(prefix="nfs-", dir="/tmp"))
    server = NfsServer(base, squash=squash).start()
    kvmrun_argv = kr.argv
    kr.argv = lambda *args: server.wrap(kvmrun_argv(*args))
    try:
        yield server
    finally:
        kr.cleanup()                    # no QEMU may be left waiting on the server
        kr.argv = kvmrun_argv
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def nfs(kr):
    with serving(kr) as server:
        yield server


@pytest.fixture
def host_b(kr, nfs):
    """A second "host": its own kvmrun directories, in the same network as the server."""
    from tests.integration.conftest import KvmrunEnv
    (kr.base / "host-b").mkdir()
    other = KvmrunEnv(kr.base / "host-b")
    other.argv = kr.argv
    yield other
    other.cleanup()


def qemu_img(server: NfsServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(server.wrap(["qemu-img", *args]), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def host_read(image: Path, length: int, offset: int = 0) -> bytes:
    """Bytes of a qcow2 image's guest view, read on the host from the export directory."""
    raw = image.with_suffix(".readback")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
                   check=True, timeout=120)
    try:
        with open(raw, "rb") as f:
            f.seek(offset)
            return f.read(length)
    finally:
        raw.unlink()


def snippet_kernel(guest, script: str) -> dict:
    code = base64.b64encode((script + "\n").encode()).decode()
    return {"path": str(guest.kernel), "initrd": str(guest.initrd),
            "append": f"console={guest.console} quiet kvmrun.run={code}"}


def serial(kr, name: str) -> str:
    return (kr.guest_dir(name) / "serial.log").read_text(errors="replace")


def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.3)
    return value


def test_nfs_pool_volumes_and_errors(kr, nfs):
    """define (userspace access), create/info/resize/snapshot/delete volumes over NFS, the
    pool's space as statvfs on the export sees it, and each failure as a plain message
    with nothing left behind."""
    out = kr.ok("pool", "define", "shared", "--type", "nfs", "--source", nfs.source).out
    assert out == (f"defined pool shared on NFS export {nfs.source} (access userspace: "
                   f"QEMU opens {URL}/VOLUME)\n")
    created = json.loads(kr.ok("disk", "create", "--pool", "shared", "base.qcow2", "-s", "64M",
                               "--json").out)
    assert (created["path"], created["format"], created["virtual_size"]) == \
        (f"{URL}/base.qcow2", "qcow2", 64 << 20)
    host = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(nfs.export_dir / "base.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert (host["format"], host["virtual-size"]) == ("qcow2", 64 << 20)
    kr.ok("disk", "create", "--pool", "shared", "top.qcow2", "--backing", "base.qcow2")
    kr.ok("disk", "create", "--pool", "shared", "scratch.img", "-s", "1M", "-f", "raw")

    info = json.loads(kr.ok("pool", "info", "shared", "--json").out)
    st = os.statvfs(nfs.export_dir)
    assert (info["type"], info["access"], info["available"]) == ("nfs", "userspace", True)
    assert info["capacity"] == st.f_blocks * st.f_frsize and 0 < info["free"] <= info["capacity"]
    rows = {v["name"]: v for v in info["volumes"]}
    assert sorted(rows) == ["base.qcow2", "scratch.img", "top.qcow2"]
    assert (rows["scratch.img"]["format"], rows["scratch.img"]["virtual_size"]) == ("raw", 1 << 20)
    assert rows["top.qcow2"]["backing_file"] == f"{URL}/base.qcow2"
    local = kr.base / "local.qcow2"                    # a local overlay on the NFS base
    kr.ok("disk", "create", local, "--backing", f"{URL}/base.qcow2")
    assert json.loads(kr.ok("disk", "info", local, "--json").out)["backing_file"] == \
        f"{URL}/base.qcow2"
    assert "access   userspace: QEMU opens" in kr.ok("pool", "info", "shared").out

    # resize and snapshots of a volume, with qemu-img on the URL
    assert kr.ok("disk", "resize", f"{URL}/scratch.img", "+3M").out == \
        f"resized {URL}/scratch.img: 1 MiB -> 4 MiB\n"
    assert (nfs.export_dir / "scratch.img").stat().st_size == 4 << 20
    snap_profile = kr.base / "snap.yaml"
    snap_profile.write_text("name: snap\ndisks:\n  - {pool: shared, volume: base.qcow2}\n")
    kr.ok("snapshot", "create", snap_profile, "before")
    assert [r["name"] for r in json.loads(kr.ok("snapshot", "list", snap_profile,
                                                "--json").out)] == ["before"]
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(nfs.export_dir / "base.qcow2")],
                            capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bbefore\b", listed)
    kr.ok("snapshot", "delete", snap_profile, "before")

    # failures: plain, one line of message plus a hint, nothing left behind
    code, _, err = kr.run("disk", "create", "--pool", "shared", "base.qcow2", "-s", "1M")
    assert code == 1 and f"{URL}/base.qcow2 already exists" in err
    code, _, err = kr.run("disk", "info", f"{URL}/nope.qcow2")
    assert code == 1 and "no such disk image" in err
    code, _, err = kr.run("pool", "define", "bad", "--type", "nfs", "--source", "no-colon")
    assert code == 1 and "is not an NFS source" in err
    code, _, err = kr.run("pool", "define", "gone", "--type", "nfs", "--source",
                          "127.0.0.1:/no-such-export")
    assert code == 1 and "refuses to mount the export" in err and "hint:" in err
    code, _, err = kr.run("pool", "define", "far", "--type", "nfs", "--source",
                          "192.0.2.1:/export")
    assert code == 1 and "cannot reach the NFS server" in err and "Traceback" not in err
    if storage_nfs.kernel_possible() is not None:
        code, _, err = kr.run("pool", "define", "k", "--type", "nfs", "--source", nfs.source,
                              "--access", "kernel")
        assert code == 1 and "--access kernel cannot work here" in err
    # no server at all in a fresh namespace: rpcbind is what QEMU's NFSv3 client asks first
    plain_argv = kr.argv("pool", "info", "shared")[3:]          # without the nsenter
    alone = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"',
                            "-", *plain_argv], env=kr.env, capture_output=True, text=True,
                           timeout=120, cwd=kr.base)
    assert alone.returncode == 1 and "rpcbind (port 111) does not answer" in alone.stderr, \
        alone.stderr
    assert [p["name"] for p in json.loads(kr.ok("pool", "list", "--json").out)] == ["shared"]
    leftovers = [p.name for p in nfs.export_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert kr.ok("disk", "delete", "--pool", "shared", "scratch.img").out == \
        f"deleted {URL}/scratch.img\n"
    assert not (nfs.export_dir / "scratch.img").exists()
    code, _, err = kr.run("disk", "delete", "--pool", "shared", "scratch.img")
    assert code == 1 and "no volume 'scratch.img' in pool 'shared'" in err


def test_root_squash_is_explained(kr):
    """A server that maps root to nobody: creating a volume as root is refused, and the
    message says why; no file is left on the export."""
    with serving(kr, squash="Root_Squash") as server:
        kr.ok("pool", "define", "sq", "--type", "nfs", "--source", server.source)
        code, _, err = kr.run("disk", "create", "--pool", "sq", "v.qcow2", "-s", "1M")
        assert code == 1 and "permission denied by the NFS server" in err, err
        assert "root_squash" in err
        assert list(server.export_dir.iterdir()) == []


@pytest.mark.skipif(storage_nfs.kernel_possible() is not None,
                    reason=f"the kernel NFS path cannot work here: "
                           f"{storage_nfs.kernel_possible()}")
def test_kernel_access_mounts_the_export(kr, nfs):
    """Where `mount -t nfs` works: pool start mounts, volumes are files on the mount (seen
    in the export directory), pool stop unmounts."""
    mount_dir = kr.base / "mnt"
    kr.ok("pool", "define", "k", "--type", "nfs", "--source", nfs.source, "--access", "kernel",
          "--mount-dir", mount_dir, "--options", "vers=3,nolock")
    try:
        assert kr.ok("pool", "start", "k").out == f"mounted {nfs.source} at {mount_dir}\n"
        assert storage_nfs.mounted(str(mount_dir))
        kr.ok("disk", "create", "--pool", "k", "v.qcow2", "-s", "4M")
        assert (nfs.export_dir / "v.qcow2").is_file()
        info = json.loads(kr.ok("pool", "info", "k", "--json").out)
        assert (info["access"], [v["name"] for v in info["volumes"]]) == ("kernel", ["v.qcow2"])
    finally:
        kr.run("pool", "stop", "k")
    assert not storage_nfs.mounted(str(mount_dir))


WRITER = """\
echo KVMRUN-NFS-MARKER | dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null
echo "READBACK: $(head -c 17 /dev/vdb)"
echo scribble | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
( i=0; while true; do i=$((i+1))
    echo "W$i" | dd of=/dev/vdb bs=512 seek=8 count=1 conv=sync,fsync 2>/dev/null
    echo "WROTE $i"; sleep 0.3; done ) &
"""


@pytest.mark.qemu
@pytest.mark.slow
def test_guest_on_nfs_survives_the_server_going_away(kr, nfs, host_b, tiny_guest):
    """The tiny guest on a local overlay over an NFS base, writing to an NFS data disk.
    QEMU shows the URL; the marker is read back on the host from the export directory;
    `disk delete` is refused while in use. The server is killed while the guest writes
    and comes back read-only: QEMU's I/O fails and, with werror: stop, the guest pauses
    and `kvmrun status` says why; once the server is right again, `kvmrun resume` carries
    on and `qemu-img check` finds the image clean."""
    kr.ok("pool", "define", "shared", "--type", "nfs", "--source", nfs.source)
    kr.ok("disk", "create", "--pool", "shared", "base.qcow2", "-s", "8M")
    kr.ok("disk", "create", "--pool", "shared", "data.qcow2", "-s", "8M")
    base_before = (nfs.export_dir / "base.qcow2").read_bytes()
    profile = kr.profile("nfsvm", tiny_guest, kernel=snippet_kernel(tiny_guest, WRITER),
                         disks=[{"pool": "shared", "volume": "base.qcow2", "ephemeral": True},
                                {"pool": "shared", "volume": "data.qcow2",
                                 "werror": "stop", "rerror": "stop"}])
    cmdline = kr.ok("cmdline", profile).out
    # a QEMU that drops to the kvmrun user keeps root's descriptors (kvmrun.qemu.compile)
    keep = ",auto-read-only=off" if " -runas " in cmdline or " -run-with " in cmdline else ""
    assert f"file={URL}/data.qcow2,format=qcow2,if=none,id=drive-disk1{keep},werror=stop," \
           "rerror=stop" in cmdline
    kr.start(profile)
    assert "READBACK: KVMRUN-NFS-MARKER" in serial(kr, "nfsvm")

    # QEMU, the oracle: the data disk is QEMU's nfs driver on the URL; the base of the
    # local overlay too
    status = kr.status("nfsvm")
    files = {d["device"]: d["file"] for d in status["disks"]}
    assert files["disk1"] == f"{URL}/data.qcow2"
    assert files["disk0"].startswith(str(kr.guest_dir("nfsvm")))     # the local overlay
    nodes = query(kr.guest_dir("nfsvm") / "qmp-cli.sock", "query-named-block-nodes",
                  timeout=10)
    nfs_nodes = sorted(n["file"] for n in nodes if n["drv"] == "nfs")
    assert nfs_nodes == [f"{URL}/base.qcow2", f"{URL}/data.qcow2"]   # base under the overlay
    overlay = next(n for n in nodes if n["file"] == files["disk0"] and n["drv"] == "qcow2")
    assert overlay["backing_file"] == f"{URL}/base.qcow2"
    code, _, err = kr.run("disk", "delete", "--pool", "shared", "data.qcow2")
    assert code == 4 and "in use by running guest 'nfsvm' (disk1)" in err
    assert "in use by nfsvm" in kr.ok("pool", "info", "shared").out
    second = kr.profile("nfsvm2", tiny_guest, disks=[{"pool": "shared", "volume": "data.qcow2"}])
    code, _, err = kr.run("start", second)
    assert code == 4 and f"disk {URL}/data.qcow2 is in use by running guest 'nfsvm'" in err

    # a second host with the same pool sees the same volumes, but cannot know that a guest
    # of the first host uses one: kvmrun's own check is per host, and QEMU's NFS driver
    # takes no image locks (a local file's QEMU would refuse: 'Failed to get "write" lock')
    host_b.ok("pool", "define", "shared", "--type", "nfs", "--source", nfs.source)
    seen = json.loads(host_b.ok("pool", "info", "shared", "--json").out)["volumes"]
    assert [(v["name"], v["in_use_by"]) for v in seen] == [("base.qcow2", None),
                                                          ("data.qcow2", None)]
    unlocked = qemu_img(nfs, "check", f"{URL}/data.qcow2")         # no -U: takes locks
    assert "lock" not in unlocked.stderr, unlocked

    # the server dies while the guest writes, and comes back refusing writes
    wait_for(lambda: "WROTE 2" in serial(kr, "nfsvm"), "the guest writing")
    nfs.kill_ganesha()
    nfs.start_ganesha(read_only=True)
    paused = kr.wait_state("nfsvm", lambda s: s.get("qemu_status") == "io-error")
    assert paused["state"] == "paused"
    assert paused["paused_reason"].startswith(
        f"paused by QEMU after an I/O error on disk1 ({URL}/data.qcow2): I/O error")
    assert [d["io_status"] for d in paused["disks"] if d["device"] == "disk1"] == ["failed"]
    text = kr.ok("status", "nfsvm").out
    assert re.search(r"^  why +paused by QEMU after an I/O error on disk1", text, re.M), text
    wrote = len(re.findall(r"WROTE \d+", serial(kr, "nfsvm")))

    nfs.kill_ganesha()
    nfs.start_ganesha()
    kr.ok("resume", "nfsvm")
    wait_for(lambda: len(re.findall(r"WROTE \d+", serial(kr, "nfsvm"))) > wrote + 2,
             "the guest writing again after resume")
    assert kr.status("nfsvm")["qemu_status"] == "running"
    grown = json.loads(kr.ok("disk", "resize", f"{URL}/data.qcow2", "+8M", "--json").out)
    assert (grown["live"], grown["old_size"], grown["virtual_size"]) == \
        ("nfsvm", 8 << 20, 16 << 20)                             # block_resize in the guest
    blocks = query(kr.guest_dir("nfsvm") / "qmp-cli.sock", "query-block", timeout=10)
    assert [b["inserted"]["image"]["virtual-size"] for b in blocks
            if b["device"] == "drive-disk1"] == [16 << 20]
    kr.ok("stop", "nfsvm")

    data = nfs.export_dir / "data.qcow2"
    assert host_read(data, 18) == b"KVMRUN-NFS-MARKER\n"
    last = int(re.findall(r"WROTE (\d+)", serial(kr, "nfsvm"))[-1])
    written = host_read(data, 16, offset=8 * 512).split(b"\n")[0]
    assert written.startswith(b"W") and int(written[1:]) >= last      # the loop's last write
    check = qemu_img(nfs, "check", f"{URL}/data.qcow2")
    assert check.returncode == 0 and "No errors were found" in check.stdout, check
    assert (nfs.export_dir / "base.qcow2").read_bytes() == base_before   # the overlay took it
    kr.ok("disk", "delete", "--pool", "shared", "data.qcow2")
