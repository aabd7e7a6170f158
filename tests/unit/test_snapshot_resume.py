"""The RAM state a start loads after an offline revert (kvmrun.ops.snapshots), without a
guest: a disk-only snapshot never arranges it; the pending state is consumed by the first
start that looks, and dropped when the disks no longer match it. Real qemu-img; the loading
itself (QEMU's -loadvm) is tests/integration/test_snapshot_resume.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kvmrun import paths
from kvmrun.ops import snapshots as snapops
from kvmrun.profile import load

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@pytest.fixture
def vm(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    disk = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(disk)], check=True)
    profile = tmp_path / "vm.yaml"
    profile.write_text(f"name: vm\narch: x86_64\ndisks:\n  - {{path: {disk}}}\n")
    return profile, disk


def _pending(snap: str, disk) -> None:
    """What an offline revert of a snapshot with RAM state leaves (savevm made it)."""
    path = paths.resume_path("vm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"snapshot": snap, "disks": [str(disk)], "made": 0}))


def test_a_disk_only_snapshot_boots(vm):
    profile, _ = vm
    result = snapops.run(str(profile), "revert", "s1")
    assert (result["live"], result["resume"], result["note"]) == (False, False, None)
    assert not paths.resume_path("vm").exists()


def test_the_pending_ram_state_is_one_shot_and_checked(vm, tmp_path):
    profile, disk = vm
    p = load(profile)
    _pending("s1", disk)
    assert snapops.take_resume(p) == "s1"
    assert snapops.take_resume(p) is None                       # once
    _pending("gone", disk)                                      # the disks lack it
    assert snapops.take_resume(p) is None and not paths.resume_path("vm").exists()
    _pending("s1", tmp_path / "other.qcow2")                    # other disks now
    assert snapops.take_resume(p) is None
    paths.resume_path("vm").write_text("not json")
    assert snapops.take_resume(p) is None and not paths.resume_path("vm").exists()
    _pending("s1", disk)                                        # deleting the snapshot
    snapops.run(str(profile), "delete", "s1")                   # forgets it
    assert not paths.resume_path("vm").exists()
