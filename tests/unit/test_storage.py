"""Storage: disk create/info/resize/backing with the real qemu-img and its error cases, the
profile keys for disks/shares/cloud-init and what they compile to, cloud-init seeds read back
as ISO images, snapshots while stopped, and the ssh command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmrun.storage import cloudinit, disks, images
from kvmrun.cli import main
from kvmrun.qemu.compile import HostFacts, compile
from kvmrun.errors import ProfileError
from kvmrun.paths import RunPaths
from kvmrun.profile import load
from kvmrun.ops.defined import load as store_load     # with pool volumes resolved
from kvmrun.ops.ssh import ssh_argv

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
GiB = 1 << 30


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def qemu_img_info(path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("text,expected", [
    ("20G", ("", 20 * GiB)), ("512M", ("", 512 << 20)), ("1.5G", ("", 1536 << 20)),
    ("1T", ("", 1 << 40)), ("4096", ("", 4096)), ("2GiB", ("", 2 * GiB)), ("64k", ("", 65536)),
])
def test_sizes(text, expected):
    assert images.parse_disk_size(text) == expected


def test_relative_sizes():
    assert images.parse_disk_size("+5G", relative=True) == ("+", 5 * GiB)
    assert images.parse_disk_size("-1G", relative=True) == ("-", GiB)


@pytest.mark.parametrize("text", ["20Q", "", "G", "+5G", "0", "-1G", "1.3", "twenty"])
def test_bad_sizes(text):
    with pytest.raises(images.StorageError):
        images.parse_disk_size(text)


# ---------------------------------------------------------------- create / info

def test_create_qcow2_raw_and_info(tmp_path, capsys):
    code, out, _ = cli(capsys, "disk", "create", tmp_path / "a.qcow2", "--size", "20G")
    assert code == 0 and out == f"created {tmp_path}/a.qcow2 (qcow2, 20 GiB)\n"
    assert qemu_img_info(tmp_path / "a.qcow2")["virtual-size"] == 20 * GiB
    code, out, _ = cli(capsys, "disk", "create", tmp_path / "b.img", "-s", "64M", "-f", "raw")
    assert code == 0 and (tmp_path / "b.img").stat().st_size == 64 << 20
    assert qemu_img_info(tmp_path / "b.img")["format"] == "raw"
    code, out, _ = cli(capsys, "disk", "info", tmp_path / "a.qcow2", "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "qcow2" and info["virtual_size"] == 20 * GiB
    assert info["backing_file"] is None and info["in_use_by"] is None
    code, out, _ = cli(capsys, "disk", "info", tmp_path / "a.qcow2")
    assert "format   qcow2" in out and "size     20 GiB (21474836480 bytes)" in out


def test_overlay_on_a_base_pins_the_backing_format(tmp_path, capsys):
    base = tmp_path / "base.img"
    images.create(base, 32 << 20, "raw")
    code, out, _ = cli(capsys, "disk", "create", tmp_path / "ov.qcow2", "--backing", base)
    assert code == 0, out
    info = qemu_img_info(tmp_path / "ov.qcow2")
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"          # pinned (-F), never probed
    assert info["virtual-size"] == 32 << 20                  # the base's size by default
    ov2 = images.create(tmp_path / "ov2.qcow2", GiB, backing=str(tmp_path / "ov.qcow2"))
    assert ov2["backing_chain"] == [str(tmp_path / "ov.qcow2"), str(base)]
    assert ov2["virtual_size"] == GiB


def test_create_never_overwrites(tmp_path, capsys):
    (tmp_path / "x.qcow2").write_text("precious")
    code, _, err = cli(capsys, "disk", "create", tmp_path / "x.qcow2", "--size", "1G")
    assert code == 1 and "already exists" in err
    assert (tmp_path / "x.qcow2").read_text() == "precious"


@pytest.mark.parametrize("args,message,code", [
    (["--size", "20Q"], "'20Q' is not a disk size", 2),
    (["--size", "0"], "a disk size must be more than 0", 2),
    (["--size", "+1G"], "'+1G' is not a disk size", 2),
    (["--size", "1.5B"], "is not a whole number of bytes", 2),
    ([], "give a size (--size 20G) or a backing image (--backing)", None),
    (["--backing", "missing.qcow2"], "backing image", None),
    (["--size", "1G", "-f", "vmdk"], "format 'vmdk' is not supported", None),
])
def test_create_errors_leave_no_file(tmp_path, capsys, monkeypatch, args, message, code):
    monkeypatch.chdir(tmp_path)
    got, _, err = cli(capsys, "disk", "create", "new.qcow2", *args)
    assert got != 0 and message in err, err
    assert code is None or got == code, (got, err)
    assert sorted(os.listdir(tmp_path)) == []


def test_raw_with_backing_refused(tmp_path):
    images.create(tmp_path / "base.qcow2", GiB)
    with pytest.raises(images.StorageError, match="must be qcow2"):
        images.create(tmp_path / "o.img", None, "raw", str(tmp_path / "base.qcow2"))
    assert not (tmp_path / "o.img").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(images.StorageError, match="does not exist"):
        images.create(tmp_path / "no" / "a.qcow2", GiB)


def test_backing_chain_loops_are_refused(tmp_path):
    # base2 already names (dangling) c.qcow2 as its base: c on base2 would close a loop
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    str(tmp_path / "c.qcow2"), "-F", "qcow2", str(tmp_path / "base2.qcow2"),
                    "1G"], check=True)
    with pytest.raises(images.StorageError, match="backing chain loop: .*c.qcow2 -> "
                                                   ".*base2.qcow2 -> .*c.qcow2"):
        images.create(tmp_path / "c.qcow2", None, backing=str(tmp_path / "base2.qcow2"))
    assert not (tmp_path / "c.qcow2").exists()
    # an existing loop l1 -> l2 -> l1
    images.create(tmp_path / "l1.qcow2", GiB)
    images.create(tmp_path / "l2.qcow2", None, backing=str(tmp_path / "l1.qcow2"))
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(tmp_path / "l2.qcow2"), "-F",
                    "qcow2", str(tmp_path / "l1.qcow2")], check=True)
    with pytest.raises(images.StorageError, match="backing chain loop"):
        images.create(tmp_path / "l3.qcow2", None, backing=str(tmp_path / "l2.qcow2"))
    assert not (tmp_path / "l3.qcow2").exists()
    # a broken chain
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    str(tmp_path / "gone.qcow2"), "-F", "qcow2", str(tmp_path / "b.qcow2"),
                    "1G"], check=True)
    with pytest.raises(images.StorageError, match="backing chain broken"):
        images.create(tmp_path / "d.qcow2", None, backing=str(tmp_path / "b.qcow2"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: too small for a qcow2 image's metadata."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_directory(small_tmpfs, capsys):
    code, _, err = cli(capsys, "disk", "create", small_tmpfs / "big.qcow2", "--size", "20G")
    assert code == 1
    assert err == (f"kvmrun: error: cannot create {small_tmpfs}/big.qcow2: not enough space "
                   f"in {small_tmpfs}\n  hint: free some space or choose another directory\n")
    assert os.listdir(small_tmpfs) == []                      # no partial file, no temp file


def test_info_errors(tmp_path, capsys):
    code, _, err = cli(capsys, "disk", "info", tmp_path / "nothere.qcow2")
    assert code == 1 and "no such disk image" in err
    (tmp_path / "junk.qcow2").write_bytes(b"QFI\xfbjunk")
    code, _, err = cli(capsys, "disk", "info", tmp_path / "junk.qcow2")
    assert code == 1 and "cannot read" in err


# ---------------------------------------------------------------- resize

def test_resize_offline(tmp_path, capsys):
    disk = tmp_path / "a.qcow2"
    images.create(disk, GiB)
    code, out, _ = cli(capsys, "disk", "resize", disk, "+5G")
    assert code == 0 and out == f"resized {disk}: 1 GiB -> 6 GiB\n"
    assert qemu_img_info(disk)["virtual-size"] == 6 * GiB
    code, out, _ = cli(capsys, "disk", "resize", disk, "8G")
    assert code == 0 and qemu_img_info(disk)["virtual-size"] == 8 * GiB
    code, _, err = cli(capsys, "disk", "resize", disk, "2G")
    assert code == 1 and "add --shrink if you mean it" in err
    assert qemu_img_info(disk)["virtual-size"] == 8 * GiB
    code, _, _ = cli(capsys, "disk", "resize", disk, "-6G", "--shrink")
    assert code == 0 and qemu_img_info(disk)["virtual-size"] == 2 * GiB
    raw = tmp_path / "r.img"
    images.create(raw, 16 << 20, "raw")
    disks.resize(str(raw), "+16M")
    assert raw.stat().st_size == 32 << 20


def test_resize_errors(tmp_path, capsys):
    code, _, err = cli(capsys, "disk", "resize", tmp_path / "none.qcow2", "+1G")
    assert code == 1 and "no such disk image" in err
    images.create(tmp_path / "a.qcow2", GiB)
    code, _, err = cli(capsys, "disk", "resize", tmp_path / "a.qcow2", "+1Q")
    assert code == 2 and "is not a disk size" in err          # a usage error, as in profiles
    code, _, err = cli(capsys, "disk", "resize", tmp_path / "none.qcow2", "1Q")
    assert code == 2 and "is not a disk size" in err          # before looking at the disk
    code, _, err = cli(capsys, "disk", "resize", tmp_path / "a.qcow2", "-2G", "--shrink")
    assert code == 1 and "the new size would be" in err
    code, _, err = cli(capsys, "disk", "resize", tmp_path / "a.qcow2", "+1G", "--live", "nope")
    assert code == 4 and "nope is not running" in err


# ---------------------------------------------------------------- profiles

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    return path


def test_profile_disk_keys(tmp_path):
    p = load(write(tmp_path, "arch: x86_64\ndisks:\n  - {path: new.qcow2, size: 20G}\n"
                             "  - {path: ov.qcow2, backing: base.img}\n"
                             "  - {path: scratch.img, ephemeral: true}\n"))
    assert p.disks[0].size == 20 * 1024 and p.disks[1].backing == str(tmp_path / "base.img")
    assert p.disks[2].ephemeral
    from kvmrun.qemu.checks import missing_files
    assert [e.reason for e in missing_files(p)] == [
        f"backing image {str(tmp_path / 'base.img')!r} not found",
        f"disk {str(tmp_path / 'scratch.img')!r} not found"]


@pytest.mark.parametrize("disk,message", [
    ("{path: a.img, backing: b.img, format: raw}", "a disk with a backing image is a qcow2"),
    ("{path: a.img, ephemeral: true, readonly: true}", "cannot be ephemeral"),
    ("{path: a.img, backing: a.img}", "cannot be its own backing image"),
    ("{path: a.img, size: lots}", "'lots' is not a size"),
])
def test_profile_disk_errors(tmp_path, disk, message):
    with pytest.raises(ProfileError, match=message):
        load(write(tmp_path, f"arch: x86_64\ndisks: [{disk}]\n"))


def test_share_errors(tmp_path):
    with pytest.raises(ProfileError, match="used twice"):
        load(write(tmp_path, "shares: [{path: ., tag: a}, {path: ., tag: a}]\n"))
    with pytest.raises(ProfileError, match="is not a mount tag"):
        load(write(tmp_path, "shares: [{path: ., tag: 'a b'}]\n"))


def test_compile_overlays_seed_and_shares(tmp_path):
    p = load(write(tmp_path, "name: t\narch: x86_64\naccel: tcg\nnetwork: []\ndevices: []\n"
                             "disks:\n  - {path: base.img, format: raw, ephemeral: true}\n"
                             "  - {path: data.qcow2, format: qcow2}\n"
                             "shares: [{path: src, tag: src, readonly: true}, "
                             "{path: 'a,b', tag: out, security_model: mapped-xattr}]\n"
                             "cloud_init: {hostname: box}\n"))
    argv = compile(p, HostFacts(), RunPaths(Path("/run/kvmrun/t")))
    text = " ".join(argv)
    assert ("-drive file=/run/kvmrun/t/overlay-disk0.qcow2,format=qcow2,if=none,"
            "id=drive-disk0") in text
    assert f"-drive file={tmp_path}/data.qcow2,format=qcow2,if=none,id=drive-disk1" in text
    assert ("-drive file=/run/kvmrun/t/cidata.iso,format=raw,if=none,id=drive-cidata,"
            "readonly=on -device virtio-blk-pci,drive=drive-cidata,id=cidata") in text
    assert (f"-fsdev local,id=fsdev0,path={tmp_path}/src,security_model=none,readonly=on "
            "-device virtio-9p-pci,fsdev=fsdev0,mount_tag=src,id=share0") in text
    assert f"path={tmp_path}/a,,b,security_model=mapped-xattr -device" in text


@pytest.mark.parametrize("arch, interface, devices", [
    ("x86_64", "ide", ["ide-cd,drive=drive-cidata,id=cidata,bus=ide.0"]),
    ("x86_64", "scsi", ["virtio-scsi-pci,id=scsi0",
                        "scsi-cd,drive=drive-cidata,id=cidata,bus=scsi0.0"]),
    ("aarch64", "virtio", ["virtio-blk-pci,drive=drive-cidata,id=cidata"]),
    ("aarch64", "scsi", ["virtio-scsi-pci,id=scsi0",
                         "scsi-cd,drive=drive-cidata,id=cidata,bus=scsi0.0"]),
    ("aarch64", "ide", ["ich9-ahci,id=ahci0", "ide-cd,drive=drive-cidata,id=cidata,bus=ahci0.0"]),
])
def test_compile_seed_interface(tmp_path, arch, interface, devices):
    """cloud_init.interface puts the seed on virtio-blk (a disk) or an IDE/SCSI CD-ROM."""
    p = load(write(tmp_path, f"name: t\narch: {arch}\nnetwork: []\ndevices: []\n"
                             f"cloud_init: {{interface: {interface}}}\n"))
    argv = compile(p, HostFacts(), RunPaths(Path("/run/kvmrun/t")))
    found = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"]
    assert found == devices
    drive = argv[argv.index("-drive") + 1]
    assert ("media=cdrom" in drive) == (interface != "virtio")
    assert "readonly=on" in drive


def test_ensure_disks_makes_sized_and_backed_disks(tmp_path):
    images.create(tmp_path / "base.img", 8 << 20, "raw")
    p = load(write(tmp_path, "arch: x86_64\ndisks:\n  - {path: new.qcow2, size: 64M}\n"
                             "  - {path: ov.qcow2, backing: base.img}\n"
                             "  - {path: r.img, size: 1M, format: raw}\n"))
    made = disks.ensure_disks(p)
    assert made == [str(tmp_path / n) for n in ("new.qcow2", "ov.qcow2", "r.img")]
    assert qemu_img_info(tmp_path / "new.qcow2")["virtual-size"] == 64 << 20
    assert qemu_img_info(tmp_path / "ov.qcow2")["backing-filename-format"] == "raw"
    assert (tmp_path / "r.img").stat().st_size == 1 << 20
    assert disks.ensure_disks(p) == []                      # only when missing
    assert [d.format for d in disks.with_formats(p).disks] == ["qcow2", "qcow2", "raw"]


def test_ensure_disks_failure_removes_what_it_made(tmp_path):
    p = load(write(tmp_path, "arch: x86_64\ndisks:\n  - {path: new.qcow2, size: 64M}\n"
                             "  - {path: ov.qcow2, backing: gone.img}\n"))
    with pytest.raises(ProfileError, match=r"disks\[1\]: backing image .*gone.img not found"):
        disks.ensure_disks(p)
    assert sorted(os.listdir(tmp_path)) == ["vm.yaml"]


def test_overlay_leaves_the_base_alone(tmp_path):
    base = tmp_path / "base.img"
    images.create(base, 1 << 20, "raw")
    before = base.read_bytes()
    overlay = tmp_path / "overlay-disk0.qcow2"
    images.create_overlay(overlay, str(base), "raw")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 4096", str(overlay)],
                   check=True, capture_output=True)
    assert base.read_bytes() == before
    assert qemu_img_info(overlay)["backing-filename"] == str(base)


# ---------------------------------------------------------------- cloud-init

def isoinfo(iso: Path, *args: str) -> str:
    return subprocess.run(["isoinfo", "-i", str(iso), *args], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("isoinfo") is None or shutil.which("genisoimage") is None,
                    reason="needs genisoimage")
def test_cloud_init_seed(tmp_path):
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAAfile me@host\n")
    p = load(write(tmp_path, "name: web\ncloud_init:\n  hostname: box\n"
                             "  ssh_authorized_keys: [ssh-rsa AAAAinline x@y, id.pub]\n"
                             "  password: secret\n"
                             "  user_data: {packages: [htop]}\n"
                             "  meta_data: {instance-id: iid-1}\n"
                             "  network_config: {version: 2, ethernets: {eth0: {dhcp4: true}}}\n"))
    iso = tmp_path / "run" / "cidata.iso"
    assert cloudinit.build_seed(p, iso)
    assert "Volume id: cidata" in isoinfo(iso, "-d")
    user = isoinfo(iso, "-R", "-x", "/user-data")
    assert user.startswith("#cloud-config\n")
    import yaml
    config = yaml.safe_load(user)
    assert config == {"packages": ["htop"], "ssh_authorized_keys": [
        "ssh-rsa AAAAinline x@y", "ssh-ed25519 AAAAfile me@host"], "hostname": "box",
        "password": "secret", "chpasswd": {"expire": False}, "ssh_pwauth": True,
        "manage_etc_hosts": True}
    meta = yaml.safe_load(isoinfo(iso, "-R", "-x", "/meta-data"))
    assert meta == {"instance-id": "iid-1", "local-hostname": "box"}
    assert "dhcp4: true" in isoinfo(iso, "-R", "-x", "/network-config")
    mtime = iso.stat().st_mtime_ns
    assert not cloudinit.build_seed(p, iso)                   # same inputs: kept
    assert iso.stat().st_mtime_ns == mtime
    changed = load(write(tmp_path, "name: web\ncloud_init: {hostname: other}\n"))
    assert cloudinit.build_seed(changed, iso)
    meta = yaml.safe_load(isoinfo(iso, "-R", "-x", "/meta-data"))
    assert meta["local-hostname"] == "other" and meta["instance-id"] == changed.vm_uuid
    assert "network-config" not in isoinfo(iso, "-R", "-l")


def test_cloud_init_user_data_file_and_script(tmp_path):
    (tmp_path / "ud.sh").write_text("#!/bin/sh\necho hi\n")
    p = load(write(tmp_path, "cloud_init: {user_data_file: ud.sh}\n"))
    assert cloudinit.render(p)["user-data"] == "#!/bin/sh\necho hi\n"
    p = load(write(tmp_path, "cloud_init: {user_data_file: ud.sh, hostname: x}\n"))
    with pytest.raises(ProfileError, match="not that"):
        cloudinit.render(p)


# ---------------------------------------------------------------- snapshots (stopped)

def test_snapshots_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    images.create(tmp_path / "a.qcow2", 64 << 20)
    images.create(tmp_path / "ro.img", 1 << 20, "raw")
    prof = write(tmp_path, "name: vm\narch: x86_64\ndisks: [{path: a.qcow2}, "
                           "{path: ro.img, readonly: true}]\n")
    code, out, err = cli(capsys, "snapshot", "create", prof, "before")
    assert code == 0, err
    assert out == f"created snapshot before of {prof}\n"
    code, out, _ = cli(capsys, "snapshot", "list", prof, "--json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["before"] and rows[0]["disks"] == [
        str(tmp_path / "a.qcow2")]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 4096",
                    str(tmp_path / "a.qcow2")], check=True, capture_output=True)
    code, out, _ = cli(capsys, "snapshot", "revert", prof, "before")
    assert code == 0 and out == f"reverted {prof} to before\n"
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 4096",
                           str(tmp_path / "a.qcow2")], capture_output=True, text=True)
    assert "Pattern verification failed" not in read.stdout
    code, _, err = cli(capsys, "snapshot", "create", prof, "before")
    assert code == 1 and "exists already" in err
    code, _, err = cli(capsys, "snapshot", "revert", prof, "nope")
    assert code == 1 and "no snapshot named 'nope'" in err
    code, _, _ = cli(capsys, "snapshot", "delete", prof, "before")
    assert code == 0 and images.info(str(tmp_path / "a.qcow2"))["snapshots"] == []


def test_snapshots_refused_on_raw(tmp_path, capsys):
    images.create(tmp_path / "r.img", 1 << 20, "raw")
    prof = write(tmp_path, "name: vm\narch: x86_64\ndisks: [{path: r.img}]\n")
    code, _, err = cli(capsys, "snapshot", "create", prof, "s")
    assert code == 1
    assert f"{tmp_path}/r.img is a raw disk: snapshots need qcow2 disks" in err
    assert "hint: convert it: qemu-img convert -O qcow2" in err


# ---------------------------------------------------------------- ssh

def test_ssh_argv():
    fwd = ["tcp:127.0.0.1:8080-:80", "tcp:127.0.0.1:2222-:22"]
    assert ssh_argv("web", fwd) == [
        "ssh", "-p", "2222", "-o", "StrictHostKeyChecking=no", "-o",
        "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
        "127.0.0.1"]
    argv = ssh_argv("web", ["tcp:0.0.0.0:2200-10.0.2.15:22"], "debian", "/k", ["uname", "-a"])
    assert argv[2] == "2200" and argv[-6:] == ["-l", "debian", "127.0.0.1", "--", "uname",
                                              "-a"]
    assert ["-i", "/k", "-o", "IdentitiesOnly=yes"] == argv[11:15]
    from kvmrun.errors import GuestError
    with pytest.raises(GuestError, match="no port forward to guest port 22"):
        ssh_argv("web", ["tcp:127.0.0.1:2222-:2222"])


# ---------------------------------------------------------------- pools

def test_directory_pools(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    code, out, _ = cli(capsys, "pool", "define", "fast", tmp_path / "images")
    assert code == 0 and out == f"defined pool fast at {tmp_path}/images\n"
    code, _, err = cli(capsys, "pool", "define", "fast", tmp_path / "else")
    assert code == 1 and "already defined" in err
    code, out, _ = cli(capsys, "disk", "create", "--pool", "fast", "web.qcow2", "--size", "2G")
    assert code == 0 and out == f"created {tmp_path}/images/web.qcow2 (qcow2, 2 GiB)\n"
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "../escape", "-s", "1G")
    assert code == 1 and "not a valid volume name" in err
    code, _, err = cli(capsys, "disk", "create", "--pool", "slow", "a.qcow2", "-s", "1G")
    assert code == 1 and "no storage pool named 'slow'" in err and "pools: fast" in err
    code, out, _ = cli(capsys, "pool", "info", "fast", "--json")
    info = json.loads(out)
    assert info["path"] == str(tmp_path / "images") and info["free"] > 0
    assert [(v["name"], v["format"], v["virtual_size"]) for v in info["volumes"]] == [
        ("web.qcow2", "qcow2", 2 * GiB)]
    code, out, _ = cli(capsys, "pool", "list", "--json")
    assert [(r["name"], r["volumes"]) for r in json.loads(out)] == [("fast", 1)]

    prof = store_load(write(tmp_path, "arch: x86_64\ndisks: [{pool: fast, volume: web.qcow2}]\n"))
    assert prof.disks[0].path == str(tmp_path / "images" / "web.qcow2")
    with pytest.raises(ProfileError, match=r"disks\[0\]: pool and volume go together"):
        load(write(tmp_path, "arch: x86_64\ndisks: [{pool: fast}]\n"))
    with pytest.raises(ProfileError, match=r"disks\[0\].pool: no storage pool named 'x'"):
        store_load(write(tmp_path, "arch: x86_64\ndisks: [{pool: x, volume: a}]\n"))
    with pytest.raises(ProfileError, match=r"disks\[0\]: missing required key 'path'"):
        load(write(tmp_path, "arch: x86_64\ndisks: [{format: raw}]\n"))

    code, out, _ = cli(capsys, "pool", "undefine", "fast")
    assert code == 0 and (tmp_path / "images" / "web.qcow2").exists()
    code, out, _ = cli(capsys, "pool", "list", "--json")
    assert json.loads(out) == []
