"""QEMU is the oracle: every shipped and golden profile, and generated ones, compiled for TCG,
started paused by the real QEMU of its architecture, and checked over QMP against what the
profile asked for (memory, vCPUs, machine, disks, CD-ROM, boot order, MACs, forwards…).
A command line QEMU rejects fails here whatever its golden file says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qemu_oracle as oracle
from kvmrun import arch as archmod
from kvmrun.cli import main
from kvmrun.paths import RunPaths
from kvmrun.profile import load

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted(ROOT.glob("profiles/*.yaml")) + sorted(ROOT.glob("tests/unit/golden/*.yaml"))


def needs_qemu_for(profile_file: Path) -> None:
    binary = archmod.get(load(profile_file).arch).qemu
    if not shutil.which(binary):
        pytest.skip(f"{binary} is not installed")


@pytest.mark.parametrize("profile_file", CASES,
                         ids=lambda p: str(p.relative_to(ROOT).with_suffix("")))
def test_qemu_builds_what_the_profile_asks(profile_file, tmp_path, monkeypatch):
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")   # as in the goldens
    needs_qemu_for(profile_file)
    profile = oracle.prepare(profile_file, tmp_path)
    oracle.check_profile(profile, tmp_path)


def test_a_rejected_command_line_fails(tmp_path):
    """The oracle itself: QEMU's refusal surfaces as a failure carrying QEMU's message."""
    (tmp_path / "bad.yaml").write_text("arch: x86_64\nmemory: 256\n"
                                       "qemu_args: [-device, no-such-device]\n")
    profile = oracle.prepare(tmp_path / "bad.yaml", tmp_path / "work")
    with pytest.raises(oracle.QemuRefused, match="no-such-device"):
        oracle.check_profile(profile, tmp_path / "work")


def test_oneoff_flags_start_under_qemu(tmp_path, monkeypatch, capsys):
    """`kvmrun cmdline --hda test.img --cdrom install.iso --boot d -m 2048`, run by QEMU."""
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "test.img", "64M"], check=True)
    oracle.make_iso(tmp_path / "install.iso")
    monkeypatch.setenv("KVMRUN_ACCEL", "tcg")
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path))
    for var in ("KVMRUN_DATA_DIR", "KVMRUN_CONFIG_DIR", "KVMRUN_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(SystemExit) as exit_:
        main(["cmdline", "--hda", "test.img", "--cdrom", "install.iso", "--boot", "d",
              "-m", "2048", "--json"])
    assert exit_.value.code == 0
    argv = json.loads(capsys.readouterr().out)
    paths = RunPaths(tmp_path / "vm")
    paths.dir.mkdir()
    with oracle.launch(argv, paths, tmp_path) as qmp:
        assert qmp.cmd("query-memory-size-summary")["base-memory"] == 2048 * oracle.MiB
        block = {b["device"]: b for b in qmp.cmd("query-block")}
        assert block["drive-disk0"]["inserted"]["file"] == str(tmp_path / "test.img")
        assert block["drive-disk0"]["inserted"]["drv"] == "qcow2"
        assert block["drive-cdrom0"]["inserted"]["file"] == str(tmp_path / "install.iso")
        assert block["drive-cdrom0"]["removable"] is True
        assert oracle.peripheral(qmp, "disk0", "type") == "ide-hd"
        assert oracle.peripheral(qmp, "cdrom0", "bootindex") == 0
        assert oracle.peripheral(qmp, "disk0", "bootindex") == -1


# ---------------------------------------------------------------- generated profiles

NAMES = st.from_regex(r"[a-z][a-z0-9]{0,7}([._-][a-z0-9]{1,4})?", fullmatch=True)
SIZES = st.sampled_from([64, 128, "256M", "512M", "1G", "1.5G", 96])
IMAGE = st.sampled_from(["disk.img", "a,b.qcow2", "sub/dir/d.qcow2", "x y.img"])


@st.composite
def disks(draw):
    interface = draw(st.sampled_from(["virtio", "ide", "scsi", "nvme", "sd"]))
    disk = {"path": draw(IMAGE), "interface": interface}
    if draw(st.booleans()):
        disk["format"] = draw(st.sampled_from(["qcow2", "raw"]))
    if draw(st.booleans()):
        disk["cache"] = draw(st.sampled_from(["none", "writeback", "writethrough",
                                              "directsync", "unsafe"]))
    if interface not in ("ide", "sd") and draw(st.booleans()):   # QEMU refuses those
        disk["readonly"] = True
    return disk


@st.composite
def x86_profiles(draw):
    """Valid x86_64 profiles: at most three disks and a CD-ROM, which even `pc` (four IDE
    slots) can hold."""
    data = {"name": draw(NAMES), "arch": "x86_64", "memory": draw(SIZES),
            "smp": draw(st.integers(1, 4))}
    if draw(st.booleans()):
        data["machine"] = draw(st.sampled_from(["q35", "pc"]))
    listed = draw(st.lists(disks(), max_size=3))
    for i, disk in enumerate(listed):            # distinct files: QEMU locks images
        disk["path"] = f"{i}-{disk['path']}"
    if listed:
        data["disks"] = listed
    if draw(st.booleans()):
        data["cdrom"] = draw(st.sampled_from(["install.iso", "c,d.iso"]))
    order = draw(st.permutations("cdn"))
    data["boot"] = "".join(order[:draw(st.integers(0, 3))]) or None
    nets = draw(st.lists(st.fixed_dictionaries({}, optional={
        "forward": st.lists(st.sampled_from(["2222:22", "udp::5353-:53",
                                             "tcp:0.0.0.0:8080-:80"]), max_size=2,
                            unique=True),
        "mac": st.from_regex(r"52:54:00(:[0-9a-f]{2}){3}", fullmatch=True),
        "model": st.sampled_from(["virtio-net-pci", "e1000", "rtl8139"]),
    }), max_size=2))
    taken: set[str] = set()               # a host port forwarded twice is a profile error
    for net in nets:
        if "forward" in net:
            net["forward"] = [f for f in net["forward"] if f not in taken]
            taken.update(net["forward"])
    data["network"] = nets
    data["serial"] = draw(st.sampled_from(["log", "stdio", "socket", "none"]))
    data["display"] = draw(st.sampled_from(["none", "vnc"]))
    data["devices"] = draw(st.lists(st.sampled_from(["rng", "balloon", "agent", "tablet"]),
                                    unique=True))
    if draw(st.booleans()):
        secure = data.get("machine", "q35") == "q35"     # Secure Boot: q35 only
        data["firmware"] = draw(st.sampled_from(["bios", "uefi"] + ["uefi-secure"] * secure))
    if draw(st.booleans()):
        data["gdb"] = True
    data["halted"] = draw(st.booleans())
    return {k: v for k, v in data.items() if v is not None}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=x86_profiles())
def test_generated_profiles_start_under_qemu(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gen")
    source = workdir / "src" / "vm.yaml"
    source.parent.mkdir()
    source.write_text(yaml.safe_dump(data, sort_keys=False))
    profile = oracle.prepare(source, workdir)
    oracle.check_profile(profile, workdir)
