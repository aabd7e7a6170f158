"""A defined VM, run: `list --defined` shows it running with its PID; and its backing-file
overlay, once made by a start and then lost, stops the next start (the tiny guest)."""

from __future__ import annotations

import json
import os
import subprocess


def test_defined_vm_runs_and_its_lost_overlay_is_refused(kr, tiny_guest):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(kr.base / "base.qcow2"),
                    "16M"], check=True)
    profile = kr.profile("tv", tiny_guest,
                         disks=[{"path": "tv.qcow2", "backing": "base.qcow2"}])
    kr.ok("define", profile)
    [row] = json.loads(kr.ok("list", "--defined", "--json").out)
    assert (row["name"], row["state"], row["pid"]) == ("tv", "defined", None)

    kr.ok("start", "tv")
    assert (kr.base / "tv.qcow2").exists()                  # the overlay, made by start
    pid = kr.status("tv")["pid"]
    [row] = json.loads(kr.ok("list", "--defined", "--json").out)
    assert (row["name"], row["state"], row["pid"]) == ("tv", "running", pid)
    line = kr.ok("list", "--defined").out.splitlines()[1].split()
    assert line[:3] == ["tv", "running", str(pid)]
    kr.ok("stop", "tv")
    kr.wait_state("tv", lambda info: info["state"] == "stopped")
    [row] = json.loads(kr.ok("list", "--defined", "--json").out)
    assert (row["state"], row["pid"]) == ("defined", None)

    os.unlink(kr.base / "tv.qcow2")
    result = kr.run("start", "tv")
    assert result.code == 2, result
    assert f"the overlay {kr.base}/tv.qcow2" in result.err and "is gone" in result.err
    assert "kvmrun disk create" in result.err
    assert not (kr.base / "tv.qcow2").exists()              # not silently made again
    assert kr.our_processes() == {}
