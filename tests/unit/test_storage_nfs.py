"""The NFS pool module without a server: sources and URLs, the kernel path's mount and
umount command lines and calls, and how messages of libnfs, qemu-img and mount.nfs become
plain errors. The messages pinned here are ones libnfs 4.0 / QEMU 7.2 / mount.nfs print (the
libnfs ones were seen against the ganesha server of tests/integration/test_storage_nfs.py).

The kernel path cannot run on a host without the kernel's NFS client, so its calls are
checked against a stand-in `mount`/`umount` on PATH that records its argv; where the real
kernel path can work, tests/integration/test_storage_nfs.py runs it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvmrun.errors import HostError
from kvmrun.storage import nfs, pools


@pytest.mark.parametrize("text, expected", [
    ("nas:/srv/vms", ("nas", "/srv/vms")),
    ("10.0.0.5:/export/", ("10.0.0.5", "/export")),
    ("nas.example.org:/", ("nas.example.org", "/")),
])
def test_parse_source(text, expected):
    assert nfs.parse_source(text) == expected


@pytest.mark.parametrize("text", ["nas", "nas:srv", ":/srv", "nas:/a//b", "nas:/a/../b",
                                  "-x:/srv", "nas:/a b", ""])
def test_parse_source_refuses(text):
    with pytest.raises(nfs.NfsError, match="is not an NFS source"):
        nfs.parse_source(text)


def test_urls():
    assert nfs.url("nas", "/srv/vms", "a.qcow2") == "nfs://nas/srv/vms/a.qcow2"
    assert nfs.url("nas", "/srv/vms/") == "nfs://nas/srv/vms"
    assert nfs.split_url("nfs://nas/srv/vms/a.qcow2") == ("nas", "/srv/vms", "a.qcow2")
    assert nfs.split_url("nfs://nas/a.qcow2?version=4") == ("nas", "/", "a.qcow2")


def test_mount_command_lines():
    assert nfs.mount_command("nas", "/srv/vms", "/var/lib/kvmrun/nfs/p", None) == \
        ["mount", "-t", "nfs", "-o", "rw", "nas:/srv/vms", "/var/lib/kvmrun/nfs/p"]
    assert nfs.mount_command("nas", "/srv", "/mnt/p", "vers=4.2,soft,timeo=100") == \
        ["mount", "-t", "nfs", "-o", "rw,vers=4.2,soft,timeo=100", "nas:/srv", "/mnt/p"]
    assert nfs.umount_command("/mnt/p") == ["umount", "/mnt/p"]


MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
95 22 0:45 / /mnt/my\\040pool rw,relatime shared:50 - nfs4 nas:/srv rw,vers=4.2
96 22 0:46 / /mnt/other rw,relatime shared:51 - tmpfs tmpfs rw
"""


def test_mounted_reads_mountinfo():
    assert nfs.mounted("/mnt/my pool", MOUNTINFO)
    assert not nfs.mounted("/mnt/other", MOUNTINFO)        # mounted, but not NFS
    assert not nfs.mounted("/mnt", MOUNTINFO)


@pytest.fixture
def fake_mount(tmp_path, monkeypatch):
    """`mount` and `umount` on PATH that append their argv (JSON) to a log; exit code and
    stderr from FAKE_MOUNT_RC / FAKE_MOUNT_ERR."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name in ("mount", "umount"):
        script = bindir / name
        script.write_text(f"""#!/usr/bin/env python3
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:] and [{name!r}, *sys.argv[1:]]) + "\\n")
sys.stderr.write(os.environ.get("FAKE_MOUNT_ERR", ""))
sys.exit(int(os.environ.get("FAKE_MOUNT_RC", "0")))
""")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("KVMRUN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(nfs, "kernel_possible", lambda: None)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() \
            else []
    return calls


def test_kernel_pool_mounts_on_start_and_first_use(fake_mount, tmp_path):
    pool = pools.define("k", type="nfs", nfs={"source": "nas:/srv/vms",
                                              "options": "vers=4.2,soft"})
    mount_dir = str(tmp_path / "data" / "nfs" / "k")
    assert (pool["access"], pool["mount_dir"], pool["path"]) == ("kernel", mount_dir, mount_dir)
    assert fake_mount() == []                          # defining mounts nothing
    assert pools.start("k") == f"mounted nas:/srv/vms at {mount_dir}"
    assert pools.volume_path("k", "a.qcow2") == f"{mount_dir}/a.qcow2"     # first use
    assert fake_mount() == [["mount", "-t", "nfs", "-o", "rw,vers=4.2,soft", "nas:/srv/vms",
                             mount_dir]] * 2      # not really mounted, so mounted again
    assert Path(mount_dir).is_dir()
    assert pools.stop("k") == f"not mounted: {mount_dir}"
    assert pools.usage("k")["available"] is False


def test_kernel_pool_mount_failures_are_plain(fake_mount, monkeypatch):
    pools.define("k", type="nfs", nfs={"source": "nas:/srv/vms", "access": "kernel"})
    monkeypatch.setenv("FAKE_MOUNT_RC", "32")
    monkeypatch.setenv("FAKE_MOUNT_ERR", "mount.nfs: access denied by server while mounting "
                                         "nas:/srv/vms\n")
    with pytest.raises(pools.PoolError, match="cannot mount nas:/srv/vms: the server "
                                              "refuses to mount the export") as err:
        pools.start("k")
    assert "showmount -e" in err.value.hint
    monkeypatch.setenv("FAKE_MOUNT_ERR", "mount.nfs: Connection timed out\n")
    with pytest.raises(pools.PoolError, match="cannot reach the NFS server"):
        pools.start("k")


def test_kernel_access_refused_where_it_cannot_work(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setattr(nfs, "kernel_possible", lambda: "the kernel has no NFS client")
    with pytest.raises(pools.PoolError, match="--access kernel cannot work here: the kernel "
                                              "has no NFS client"):
        pools.define("k", type="nfs", nfs={"source": "nas:/srv", "access": "kernel"})
    assert not (tmp_path / "config" / "pools" / "k.json").exists()


def test_define_option_mistakes(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(pools.PoolError, match="for nfs pools"):
        pools.define("d", str(tmp_path / "d"), nfs={"source": "nas:/srv"})
    with pytest.raises(pools.PoolError, match="needs its export: --source"):
        pools.define("n", type="nfs")
    monkeypatch.setattr(nfs, "kernel_possible", lambda: "no")
    monkeypatch.setattr(nfs, "userspace_driver", lambda: None)
    with pytest.raises(pools.PoolError, match="--mount-dir and --options are for --access "
                                              "kernel"):
        pools.define("n", type="nfs", nfs={"source": "nas:/srv", "mount_dir": "/mnt/x"})


def test_userspace_needs_qemu_block_extra(monkeypatch):
    monkeypatch.setattr(nfs, "kernel_possible", lambda: "no")
    monkeypatch.setattr(nfs, "userspace_driver",
                        lambda: "QEMU's NFS block driver is missing: apt-get install "
                                "qemu-block-extra")
    with pytest.raises(HostError, match="NFS block driver is missing") as err:
        nfs.choose_access(None)
    assert err.value.hint == "apt-get install qemu-block-extra"


@pytest.mark.parametrize("message, expected", [
    ("nfs_service failed", "rpcbind (port 111) does not answer"),
    ("Could not open 'nfs://h/e/x': Failed to mount nfs share: mount_cb: RPC error: Mount "
     "failed with error MNT3ERR_ACCES(13) Permission denied(13)", "refuses to mount the export"),
    ("nfs_mount_async failed. Failed to start connection. connect() to server failed. "
     "Network is unreachable(101)", "cannot reach the NFS server"),
    ('Failed to open file : open call failed with "NFS: Lookup of /x failed with '
     'NFS3ERR_NOENT(-2)"', "no such file on the NFS server"),
    ('create call failed with "NFS: CREATE of /x failed with NFS3ERR_ACCES(-13)"',
     "permission denied by the NFS server"),
    ('link call failed with "NFS: LINK /a -> /b failed with NFS3ERR_EXIST(-17)"',
     "it exists already"),
])
def test_explain(message, expected):
    err = nfs.explain(message, "cannot do it")
    assert isinstance(err, nfs.NfsError) and err.message.startswith("cannot do it: ")
    assert expected in err.message


def test_explain_root_squash_hint():
    err = nfs.explain("NFS3ERR_ACCES(-13)", "cannot create nfs://h/e/x")
    assert "root_squash" in err.hint and "no_root_squash" in err.hint


def test_explain_driver_missing():
    err = nfs.explain("qemu-img: Unknown protocol 'nfs'", "cannot read nfs://h/e/x")
    assert isinstance(err, HostError) and err.hint == "apt-get install qemu-block-extra"


def test_paused_reason():
    from kvmrun.ops.inspect import paused_reason
    disks = [{"device": "disk0", "file": "/a.qcow2", "io_status": "ok"},
             {"device": "disk1", "file": "nfs://h/e/d.qcow2", "io_status": "nospace"}]
    assert paused_reason({"status": "paused"}, disks) is None       # paused by the user
    assert paused_reason({"status": "io-error"}, disks) == (
        "paused by QEMU after an I/O error on disk1 (nfs://h/e/d.qcow2): no space left; fix "
        "the storage (is the server back?), then `kvmrun resume` retries the failed request")


def test_profile_backing_may_be_an_nfs_url(tmp_path):
    from kvmrun.errors import ProfileError
    from kvmrun.profile import load
    good = tmp_path / "good.yaml"
    good.write_text("name: g\ndisks:\n  - path: top.qcow2\n"
                    "    backing: nfs://nas/srv/vms/base.qcow2\n    werror: stop\n")
    disk = load(good).disks[0]
    assert (disk.path, disk.backing, disk.werror, disk.rerror) == (
        str(tmp_path / "top.qcow2"), "nfs://nas/srv/vms/base.qcow2", "stop", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\ndisks:\n  - path: top.qcow2\n    backing: nfs://nas\n")
    with pytest.raises(ProfileError, match=r"bad.yaml:4: disks\[0\]\.backing: .nfs://nas. is not an "
                                           r"nfs://SERVER/EXPORT/FILE URL"):
        load(bad)
