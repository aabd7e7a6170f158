"""Resource limits against a real cgroup2 hierarchy, mounted by the test (root only).

This machine is a hybrid host: cpu, memory and io are bound to cgroup v1, so the cgroup2
mount offers none of them (only controllers no v1 hierarchy holds). There, a profile asking
for limits must be refused at start with a hint and nothing left behind; the leaf itself
(made, QEMU's stand-in moved into it before exec, removed at the end) is exercised without
limit files. On a host whose cgroup2 has the controllers, test_limits_apply boots a guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from kvmrun.guest import cgroup, ending
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest

NEEDED = {"cpu", "memory", "io"}
LIMITS = {"cpu_weight": 50, "cpu_max": 50, "memory_max": "512M", "io_weight": 10}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting cgroup2 needs root")


@pytest.fixture
def cgroot():
    """A cgroup2 mount of our own, and a parent directory in it for the test's leaves."""
    mnt = Path(tempfile.mkdtemp(prefix="krt-cg-"))
    done = subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount cgroup2 here: {done.stderr.strip()}")
    parent = mnt / f"krt-{uuid.uuid4().hex[:8]}"
    try:
        yield mnt, parent
    finally:
        for leaf in sorted(parent.glob("*"), reverse=True) if parent.exists() else []:
            if leaf.is_dir():
                os.rmdir(leaf)
        if parent.exists():
            os.rmdir(parent)
        subprocess.run(["umount", str(mnt)], check=True)
        os.rmdir(mnt)


def controllers(mnt: Path) -> set[str]:
    return set((mnt / "cgroup.controllers").read_text().split())


def test_limits_are_refused_where_cgroup2_lacks_the_controllers(kr, cgroot):
    mnt, parent = cgroot
    if NEEDED <= controllers(mnt):
        pytest.skip("this host's cgroup2 has cpu, memory and io: see test_limits_apply")
    kr.env = {**kr.env, "KVMRUN_CGROUP_ROOT": str(parent)}
    (kr.base / "l.yaml").write_text("name: l\nmemory: 64\naccel: tcg\nnetwork: []\n"
                                    "limits: " + json.dumps(LIMITS) + "\n")
    code, out, err = kr.run("start", kr.base / "l.yaml")
    missing = " or ".join(sorted(NEEDED - controllers(mnt)))
    assert code == 3, err
    assert f"the cgroup v2 hierarchy at {mnt} has no {missing} controller" in err
    assert "bound to a cgroup v1 hierarchy" in err and "Traceback" not in err
    assert not parent.exists() and not kr.guest_dir("l").exists()     # nothing left behind


def test_a_leaf_holds_the_process_from_exec_and_goes_with_the_guest(kr, cgroot, monkeypatch):
    """The mechanism the supervisor uses: make the leaf, move the child in between fork
    and exec (cgroup.enter as preexec_fn), and ending.release removes the leaf once the
    process is gone."""
    mnt, parent = cgroot
    monkeypatch.setenv("KVMRUN_CGROUP_ROOT", str(parent))
    leaf = cgroup.make_leaf("g", {})
    assert leaf == parent / "g" and leaf.is_dir()
    child = subprocess.Popen(["sleep", "600"], preexec_fn=lambda: cgroup.enter(str(leaf)))
    try:
        assert cgroup.of_pid(child.pid) == "/" + str(leaf.relative_to(mnt))
        assert (leaf / "cgroup.procs").read_text().split() == [str(child.pid)]
        assert not cgroup.remove(leaf, wait=0)           # busy while the process lives
    finally:
        child.kill()
        child.wait()
    guest = Guest("g", kr.run_dir)
    guest.paths.dir.mkdir(parents=True)
    LaunchRecord(argv=["qemu"], cgroup={"leaf": str(leaf)}).write(guest.paths.launch)
    ending.release(guest)
    assert not leaf.exists() and parent.is_dir()
    assert cgroup.make_leaf("g", {}) == leaf             # a fresh start makes it again


@pytest.mark.qemu
@pytest.mark.slow
def test_limits_apply(kr, cgroot, tiny_guest):
    """Where cgroup2 has the controllers: QEMU runs in the leaf with the limits written,
    status shows them, and the leaf goes when the guest stops."""
    mnt, parent = cgroot
    if not NEEDED <= controllers(mnt):
        pytest.skip(f"cgroup2 here has only {sorted(controllers(mnt))} (v1 holds the rest)")
    kr.env = {**kr.env, "KVMRUN_CGROUP_ROOT": str(parent)}
    kr.start(kr.profile("l", tiny_guest, limits=LIMITS))
    info = kr.status("l")
    leaf = parent / "l"
    assert info["limits"] == {**LIMITS, "memory_max": 512, "cpu_max": 50}
    assert info["cgroup"] == "/" + str(leaf.relative_to(mnt))
    assert (leaf / "cpu.max").read_text().split() == ["50000", "100000"]
    assert (leaf / "memory.max").read_text().strip() == str(512 << 20)
    assert (leaf / "cpu.weight").read_text().strip() == "50"
    assert "limits   cpu_weight 50" in kr.ok("status", "l").out
    kr.ok("stop", "l")
    kr.wait_state("l", lambda i: i["state"] != "running")
    assert not leaf.exists()
