"""`kvmrun new`: every profile it can generate validates (kvmrun.profile.from_mapping) and
compiles; `--print`; no prompts without a terminal, step-by-step questions on one."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvmrun.qemu.compile import HostFacts, compile as compile_argv
from kvmrun.errors import ProfileError
from kvmrun.ops import new, osinfo
from kvmrun.paths import RunPaths
from kvmrun.profile import from_mapping

HAVE_DB = osinfo.available()
needs_db = pytest.mark.skipif(not HAVE_DB, reason="osinfo-db not installed")


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    for key, sub in (("CONFIG", "cfg"), ("RUN", "run"), ("DATA", "data"), ("CACHE", "cache")):
        monkeypatch.setenv(f"KVMRUN_{key}_DIR", str(tmp_path / sub))
    (tmp_path / "x.iso").write_bytes(b"")
    (tmp_path / "vmlinuz").write_bytes(b"")
    (tmp_path / "disk.img").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


MODES = [dict(cdrom="x.iso"), dict(kernel="vmlinuz", initrd="vmlinuz", append="console=ttyS0"),
         dict(import_disk="disk.img"), dict(pxe=True), dict()]
FACTS = HostFacts(machine="x86_64", kvm=False,
                  uefi={"x86_64": "/usr/share/OVMF/OVMF_CODE_4M.fd"})


def _compiles(data: dict) -> list[str]:
    prof = from_mapping(data, {(): ("test", None)}, "test")
    return compile_argv(prof, FACTS, RunPaths.for_guest(prof.name, Path("/run/k")))


@needs_db
def test_every_os_and_mode_gives_a_valid_profile():
    count = 0
    for entry in osinfo.load_all("x86_64"):
        for mode in MODES:
            data = new.new_profile("vm1", os_id=entry.short_id, **mode)
            argv = _compiles(data)              # validated by from_mapping, then compiled
            assert ("-cdrom" in " ".join(argv) or "x.iso" in " ".join(argv)) == (
                "cdrom" in mode)
            count += 1
    assert count == 5 * len(osinfo.load_all("x86_64"))


@needs_db
def test_windows_11_preset():
    data = new.new_profile("w11", os_id="win11", cdrom="x.iso")
    assert data["firmware"] == "uefi" and data["memory"] == 4096 and data["smp"] == 2
    assert data["disks"] == [{"path": str(new.images_dir() / "w11.qcow2"), "size": "64G",
                              "interface": "ide"}]
    assert data["network"] == [{"type": "user", "model": "e1000e"}]
    assert data["display"] == "vnc" and "tablet" in data["devices"] and data["boot"] == "cd"
    argv = " ".join(_compiles(data))
    assert "e1000e" in argv and "ide-hd" in argv


@needs_db
def test_debian_preset_is_virtio_and_serial_for_kernel_boot():
    data = new.new_profile("d", os_id="debian11", kernel="vmlinuz", disk="8G", memory="2G",
                           cpus=2, network="isolated:lab1")
    assert data["disks"] == [{"path": str(new.images_dir() / "d.qcow2"), "size": "8G"}]
    assert data["network"] == [{"type": "isolated", "name": "lab1"}]
    assert (data["memory"], data["smp"]) == ("2G", 2) and "display" not in data


def test_without_os_kvmrun_defaults_and_pool_disks(tmp_path):
    data = new.new_profile("p", cdrom="x.iso", disk="none", network="none", uefi=True)
    assert (data["memory"], data["smp"], data["network"], data["firmware"]) == (
        1024, 1, [], "uefi")
    assert "disks" not in data
    imported = new.new_profile("i", import_disk="disk.img", disk="4G")
    assert imported["disks"][0] == {"path": str(tmp_path / "disk.img")}
    assert imported["disks"][1]["size"] == "4G" and imported["boot"] == "c"


@pytest.mark.parametrize("kwargs, message", [
    (dict(cdrom="missing.iso"), "cdrom: CD-ROM image"),
    (dict(cdrom="x.iso", pxe=True), "choose one install mode, not cdrom and pxe"),
    (dict(initrd="vmlinuz"), "--initrd needs --kernel"),
    (dict(network="wifi"), "unknown type 'wifi'"),
    (dict(network="bridge"), "needs a name"),
    (dict(memory="lots"), "memory: 'lots' is not a size"),
    (dict(disk="disk.img", pool="p1"), "--pool takes a size"),
])
def test_bad_input_is_one_plain_error(kwargs, message):
    with pytest.raises(ProfileError) as e:
        new.new_profile("vm1", **kwargs)
    assert message in str(e.value) and str(e.value).startswith("kvmrun new: ")


def _cli(env_dir, *args, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, "-m", "kvmrun", *args], stdin=stdin,
                          capture_output=True, text=True, timeout=60, cwd=env_dir)


@needs_db
def test_print_shows_the_profile_and_defines_nothing(env):
    proc = _cli(env, "new", "web1", "--os", "debian11", "--cdrom", "x.iso", "--print")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["name"] == "web1" and data["cdrom"] == str(env / "x.iso")
    assert not (env / "cfg" / "vms").exists()


def test_no_terminal_no_questions_and_the_vm_is_defined(env):
    proc = _cli(env, "new", "blank")         # nothing given: defaults, not a prompt
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"created blank ({env}/cfg/vms/blank.yaml)"
    stored = yaml.safe_load((env / "cfg" / "vms" / "blank.yaml").read_text())
    assert stored["disks"][0]["path"] == str(env / "data" / "images" / "blank.qcow2")
    assert (env / "data" / "images").is_dir()
    again = _cli(env, "new", "blank", "--memory", "2G")
    assert again.returncode == 1 and "already defined" in again.stderr


@needs_db
def test_a_terminal_gets_the_questions_in_order(env):
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: kvmrun on a terminal
        os.execv(sys.executable, [sys.executable, "-m", "kvmrun", "new", "asked"])
    answers = [("install from", "cdrom"), ("ISO image", "x.iso"),
               ("operating system", "debian1"), ("operating system", "debian11"),
               ("memory", ""), ("vCPUs", "2"), ("disk", "3G")]
    seen = b""
    try:
        for prompt, answer in answers:
            while prompt.encode() not in seen.rsplit(b"\n", 1)[-1]:
                ready, _, _ = select.select([fd], [], [], 30)
                assert ready, f"no prompt {prompt!r}; saw {seen.decode()!r}"
                seen += os.read(fd, 4096)
            os.write(fd, answer.encode() + b"\r")
            seen += b"\n"
        while True:
            ready, _, _ = select.select([fd], [], [], 30)
            try:
                chunk = os.read(fd, 4096) if ready else b""
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode()
    assert b"debian10" in seen                      # the search for "debian1" listed matches
    stored = yaml.safe_load((env / "cfg" / "vms" / "asked.yaml").read_text())
    assert stored["smp"] == 2 and stored["cdrom"] == str(env / "x.iso")
    assert stored["disks"][0]["size"] == 3072
    assert "memory" not in stored                   # debian11: 1G, which is the default
