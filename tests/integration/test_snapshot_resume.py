"""A snapshot with RAM state, reverted while the VM is stopped: the next start loads that RAM
state (`-loadvm`, once), the one after boots, also when QEMU refused the state (the profile
changed); --disk-only boots at once. The tiny guest counts
on its console from boot (`TICK 1`, `TICK 2`, …): a guest that goes on from the snapshot
goes on counting, one that boots starts again at 1. QEMU's own command line shows -loadvm."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

COUNTER = "(i=0; while true; i=$((i+1)); do echo TICK $i; sleep 1; done) &"


def _serial(kr, name: str) -> str:
    return (kr.guest_dir(name) / "serial.log").read_text(errors="replace")


def _ticks(kr, name: str, at_least: int = 1) -> list[int]:
    """The counter's values in this run's serial.log, once it shows `at_least` of them."""
    deadline = time.monotonic() + 120
    while True:
        ticks = [int(n) for n in re.findall(r"TICK (\d+)", _serial(kr, name))]
        if len(ticks) >= at_least:
            return ticks
        assert time.monotonic() < deadline, _serial(kr, name)[-2000:]
        time.sleep(0.5)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_offline_revert_of_a_ram_snapshot_resumes_once(kr, tiny_guest):
    snippet = base64.b64encode((COUNTER + "\n").encode()).decode()
    disk = kr.base / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    profile = kr.profile("tick", tiny_guest, disks=[{"path": str(disk)}], kernel={
        "path": str(tiny_guest.kernel), "initrd": str(tiny_guest.initrd),
        "append": f"console={tiny_guest.console} quiet kvmrun.run={snippet}"})
    kr.ok("define", profile)
    kr.ok("start", "tick")
    at_snapshot = max(_ticks(kr, "tick", 3))
    made = json.loads(kr.ok("snapshot", "create", "tick", "s1", "--json").out)
    assert (made["live"], made["frozen"]) == (True, False)
    assert "no guest agent port" in made["note"]
    kr.ok("stop", "tick")

    reverted = json.loads(kr.ok("snapshot", "revert", "tick", "s1", "--json").out)
    assert reverted["resume"] is True and "-loadvm" in reverted["note"]
    listed = json.loads(kr.ok("snapshot", "list", "tick", "--json").out)
    assert [(r["name"], r["next_start"]) for r in listed] == [("s1", True)], listed
    assert "s1 *" in kr.ok("snapshot", "list", "tick").out
    started = json.loads(kr.ok("start", "tick", "--json").out)
    assert "-loadvm" in _cmdline(started["pid"]) and \
        _cmdline(started["pid"])[_cmdline(started["pid"]).index("-loadvm") + 1] == "s1"
    ticks = _ticks(kr, "tick", 2)
    assert ticks[0] >= at_snapshot, ticks                     # it went on counting
    kr.ok("stop", "tick")

    # a profile changed since the snapshot: QEMU refuses the state, the start says why, and
    # the state is consumed all the same
    assert json.loads(kr.ok("snapshot", "revert", "tick", "s1", "--json").out)["resume"]
    refused = kr.run("start", "tick", "--memory", "320M")
    assert refused.code == 7, refused
    assert "could not load the RAM state of snapshot s1" in refused.err
    assert "the next start boots" in refused.err
    again = json.loads(kr.ok("start", "tick", "--json").out)  # once: this one boots
    assert "-loadvm" not in _cmdline(again["pid"])
    assert _ticks(kr, "tick", 1)[0] == 1
    kr.ok("stop", "tick")

    text = kr.ok("snapshot", "revert", "tick", "s1", "--disk-only").out
    assert "has RAM state, not loaded (--disk-only): the next start boots" in text
    assert not (kr.base / "data" / "resume" / "tick.json").exists()
    assert [r["next_start"] for r in
            json.loads(kr.ok("snapshot", "list", "tick", "--json").out)] == [False]
