"""`export --with-disks` / `import ARCHIVE`: a VM with a qcow2 backing chain, a sparse raw
disk and a UEFI variable store goes to another "host" (tests/integration/hosts.py) as a
file, through a pipe into `ssh host kvmrun import -`, and with `--to HOST`; damaged and
cut-short archives import nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.hosts import hosts  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-img"]).returncode != 0,
                                reason="needs qemu-img")


def _img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _io(image, command):
    subprocess.run(["qemu-io", "-c", command, str(image)], check=True, capture_output=True)


@pytest.fixture
def vm(kr, hosts):
    """A defined UEFI VM `web`: disk0 a qcow2 overlay on a base, disk1 a sparse raw."""
    kr.env = hosts.env(kr.env)
    d = kr.base / "disks"
    d.mkdir()
    _img("create", "-q", "-f", "qcow2", d / "base.qcow2", "64M")
    _io(d / "base.qcow2", "write -P 0x5a 1M 1M")
    _img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "web.qcow2")
    _io(d / "web.qcow2", "write -P 0x33 3M 64k")
    raw = d / "data.img"
    with open(raw, "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(b"marker")
    profile = kr.base / "web.yaml"
    profile.write_text(yaml.safe_dump({"name": "web", "memory": "128M", "firmware": "uefi",
                                       "disks": [{"path": str(d / "web.qcow2")},
                                                 {"path": str(raw), "format": "raw"}]}))
    kr.ok("define", profile)
    nvram = kr.base / "data" / "nvram" / "web_VARS.fd"
    nvram.parent.mkdir(parents=True)
    nvram.write_bytes(os.urandom(4096) + bytes(64 << 10))
    return d, nvram


def _same(a: Path, b: Path) -> None:
    done = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_round_trip_to_another_host(kr, hosts, vm):
    disks, nvram = vm
    archive = kr.base / "web.tar.zst"
    kr.ok("export", "web", "--with-disks", "-o", archive)
    listing = subprocess.run(["tar", "-tf", str(archive), "-I", "zstd"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing == ["manifest.json", "profile.yaml", "disks/web.qcow2",
                       "disks/base.qcow2", "disks/data.img", "nvram.fd"]
    assert archive.stat().st_size < 4 << 20            # holes were not stored as zeros

    uuid = json.loads(kr.ok("defined", "--json").out)[0]["uuid"]
    target = hosts["b"].root / "vmdisks"
    with open(archive, "rb") as f:
        done = subprocess.run(kr.argv("-H", "hostb", "import", "-", "--dir", target, "--json"),
                              stdin=f, env=kr.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["disks"] == [str(target / "web.qcow2"), str(target / "data.img")]
    there = json.loads(kr.ok("-H", "hostb", "defined", "--json").out)
    assert [(v["name"], v["uuid"], v["error"]) for v in there] == [("web", uuid, None)]
    _same(disks / "web.qcow2", target / "web.qcow2")
    _same(disks / "base.qcow2", target / "base.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(target / "web.qcow2")], capture_output=True,
                                     check=True).stdout)
    assert info["backing-filename"] == "base.qcow2"      # relative: the pair moves together
    raw = target / "data.img"
    assert raw.read_bytes() == (disks / "data.img").read_bytes()
    assert raw.stat().st_blocks * 512 < 8 << 20            # still sparse
    assert (hosts["b"].root / "data" / "nvram" / "web_VARS.fd").read_bytes() == \
        nvram.read_bytes()

    # importing it again is refused, and changes nothing there
    with open(archive, "rb") as f:
        again = subprocess.run(kr.argv("-H", "hostb", "import", "-", "--name", "web"),
                               stdin=f, env=kr.env, capture_output=True, text=True)
    assert again.returncode == 1 and "already defined" in again.stderr
    assert sorted(p.name for p in target.iterdir()) == ["base.qcow2", "data.img",
                                                        "web.qcow2"]

    # the same through --to, flattened, into host a's default place
    kr.ok("export", "web", "--with-disks", "--flatten", "--to", "hosta")
    flat = hosts["a"].root / "data" / "disks" / "web"
    assert sorted(p.name for p in flat.iterdir()) == ["data.img", "web.qcow2"]
    _same(disks / "web.qcow2", flat / "web.qcow2")
    assert "backing-filename" not in json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(flat / "web.qcow2")],
        capture_output=True, check=True).stdout)


def test_damaged_or_short_archives_import_nothing(kr, hosts, vm):
    disks, _ = vm
    plain = kr.base / "web.tar"
    data = subprocess.run(kr.argv("export", "web", "--with-disks", "-o", "-"), env=kr.env,
                          check=True, capture_output=True).stdout
    data = subprocess.run(["zstd", "-d", "-c"], input=data, capture_output=True,
                          check=True).stdout
    flipped = bytearray(data)
    flipped[flipped.find(b"\x5a" * 4096) + 100] ^= 1
    plain.write_bytes(bytes(flipped))
    code, out, err = kr.run("import", plain, "--name", "copy")
    assert code == 1 and "disks/base.qcow2 in the archive is damaged" in err, err
    short = kr.base / "short.tar"
    short.write_bytes(data[:len(data) // 2])
    code, out, err = kr.run("import", short, "--name", "copy")
    assert code == 1 and "nothing imported" in err, err
    assert not (kr.base / "data" / "disks").exists()
    assert not (kr.base / "data" / "nvram" / "copy_VARS.fd").exists()
    assert json.loads(kr.ok("defined", "--json").out)[0]["name"] == "web"
    assert len(json.loads(kr.ok("defined", "--json").out)) == 1
    # a running guest's disks are not archived without --live (tested with a guest in
    # test_migrate); a binary archive never goes to a terminal; -o never overwrites
    code, _, err = kr.run("export", "web", "--with-disks", "-o", plain)
    assert code == 2 and "already exists" in err


def test_export_is_self_contained_and_import_lists_every_missing_file(kr, hosts, vm):
    """.pub keys and user_data_file travel inside the profile; what cannot travel (kernel,
    initrd, a shared directory, a TFTP directory) is checked on import, every missing one
    listed before a disk is written."""
    disks, _ = vm
    files = kr.base / "files"
    files.mkdir()
    (files / "id_test").write_text("PRIVATE\n")
    (files / "id_test.pub").write_text("ssh-ed25519 AAAATESTKEY test@here\n")
    (files / "user-data").write_text("#cloud-config\nruncmd:\n  - echo hello\n")
    (files / "vmlinuz").write_bytes(b"k")
    (files / "initrd").write_bytes(b"i")
    (files / "share").mkdir()
    (files / "tftp").mkdir()
    profile = kr.base / "web2.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "web2", "memory": "128M",
        "kernel": {"path": "files/vmlinuz", "initrd": "files/initrd"},
        "disks": [{"path": str(disks / "data.img"), "format": "raw"}],
        "shares": [{"path": "files/share", "tag": "s"}],
        "network": [{"type": "user", "tftp": "files/tftp"}],
        "cloud_init": {"user_data_file": "files/user-data",
                       "ssh_authorized_keys": ["files/id_test.pub", "ssh-rsa AAAAINLINE x"]}}))
    kr.ok("define", profile)                   # relative .pub paths resolve like any path
    exported_text = kr.ok("export", "web2").out
    exported = yaml.safe_load(exported_text)
    assert exported["cloud_init"] == {
        "user_data": "#cloud-config\nruncmd:\n  - echo hello\n",
        "ssh_authorized_keys": ["ssh-ed25519 AAAATESTKEY test@here", "ssh-rsa AAAAINLINE x"]}
    assert exported["ssh"] == {"identity": str(files / "id_test")}
    archive = kr.base / "web2.tar"
    kr.ok("export", "web2", "--with-disks", "-o", archive)
    for name in ("id_test.pub", "user-data", "vmlinuz", "initrd", "id_test"):
        (files / name).unlink()
    (files / "share").rmdir()
    (files / "tftp").rmdir()

    target = hosts["b"].root / "web2disks"
    code, out, err = kr.run("-H", "hostb", "import", archive, "--dir", target)
    assert code == 2, err
    missing = [line for line in err.splitlines() if "not found" in line]
    assert [m.rsplit(": ", 1)[-1] for m in missing] == [
        f"kernel path {str(files / 'vmlinuz')!r} not found",
        f"kernel initrd {str(files / 'initrd')!r} not found",
        f"shared directory {str(files / 'share')!r} not found",
        f"TFTP directory {str(files / 'tftp')!r} not found"], err
    assert missing[0].startswith("kvmrun: error: profile.yaml of the archive of web2: "
                                 "kernel.path: ")
    assert "shares[0].path" in missing[2] and "network[0].tftp" in missing[3]
    assert "--no-check-files" in err
    assert not target.exists()                 # checked before any disk was written
    assert "web2" not in [v["name"] for v in
                          json.loads(kr.ok("-H", "hostb", "defined", "--json").out)]
    plain = kr.base / "web2-exported.yaml"           # the profile alone: the same check
    plain.write_text(exported_text)
    code, out, err = kr.run("-H", "hostb", "import", plain)
    assert code == 2 and [line.rsplit(": ", 1)[-1] for line in err.splitlines()
                          if "not found" in line] == [m.rsplit(": ", 1)[-1] for m in missing]

    for name in ("vmlinuz", "initrd"):
        (files / name).write_bytes(b"x")
    (files / "share").mkdir()
    (files / "tftp").mkdir()
    code, out, err = kr.run("-H", "hostb", "import", archive, "--dir", target)
    assert code == 0, err
    assert f"ssh.identity {files / 'id_test'} not found" in err      # a warning only
    there = yaml.safe_load(kr.ok("-H", "hostb", "export", "web2").out)
    assert there["cloud_init"] == exported["cloud_init"]


@pytest.mark.qemu
def test_status_names_export_live_while_it_holds_the_monitor(kr, tiny_guest):
    """While `export --live` copies a paused guest's disks it holds the guest's monitor
    (one client at a time): status says which command holds it and that the guest is
    paused, not "not responding"; afterwards the guest runs on and the record is gone. A
    `cp` first in the export's PATH waits for the test's word, then runs the real cp, so
    the copy lasts while the test looks."""
    from tests.integration.test_faults import wait_for
    disk = kr.base / "ex.qcow2"
    _img("create", "-q", "-f", "qcow2", disk, "16M")
    profile = kr.profile("ex", tiny_guest, memory="128M", disks=[{"path": str(disk)}])
    kr.ok("start", profile)
    shim = kr.base / "shim"
    shim.mkdir()
    waiting, go = kr.base / "cp.waiting", kr.base / "cp.go"
    (shim / "cp").write_text(f'#!/bin/sh\n: > "{waiting}"\n'
                             f'while [ ! -e "{go}" ]; do sleep 0.05; done\n'
                             f'exec {shutil.which("cp")} "$@"\n')
    (shim / "cp").chmod(0o755)
    archive = kr.base / "ex.tar"
    env = {**kr.env, "PATH": f"{shim}:{os.environ['PATH']}"}
    exporting = subprocess.Popen(kr.argv("export", profile, "--with-disks", "--live", "-o",
                                         archive), env=env, cwd=kr.base, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kr.popens.append(exporting)                # killed at teardown if it still runs
    wait_for(lambda: waiting.exists() or exporting.poll() is not None, 120, "the copy")
    assert exporting.poll() is None, exporting.communicate()
    info = wait_for(lambda: (s := kr.status("ex"))["state"] == "paused" and s, 30,
                    "the paused state")
    assert info["monitor"] == f"held by kvmrun export --live (pid {exporting.pid})", info
    assert "problem" not in info
    go.touch()
    out, err = exporting.communicate(timeout=120)
    assert exporting.returncode == 0, err
    info = kr.status("ex")
    assert info["state"] == "running" and "monitor" not in info, info
    assert not (kr.guest_dir("ex") / "monitor.json").exists()
    listed = subprocess.run(["tar", "-tf", archive], capture_output=True, text=True, check=True)
    assert "disks/ex.qcow2" in listed.stdout.split(), listed.stdout
    kr.ok("kill", "ex")
