"""Live migration of a guest with a TPM (`tpm: true`, a swtpm helper) between the two ssh
"hosts" (tests/integration/hosts.py), with the real swtpm on both sides.

One tiny guest, booted once on host a: its init runs tests/integration/tpm_commands.py's
snippet (raw TPM 2.0 on /dev/tpm0), which defines an NV index and writes a random value,
then reads the index back every second (a `TPM-AGAIN` line: boot id, response code, value).
A migration interrupted (Ctrl-C) once the target's swtpm runs leaves nothing on host b (no
swtpm, no TPM state directory) and the guest reads its value on host a as before; then a
live migration: the guest reads the same value on host b in the same boot (the state came
in the migration stream into the target's own swtpm, whose state directory is host b's),
the VM defined there keeps `tpm: true`, and host a's TPM state went with the undefine.
After the stop on host b no swtpm runs on either side.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import _cmdline, processes_mentioning
from tests.integration.hosts import hosts  # noqa: F401 - the fixture
from tests.integration.test_migrate import left_on, wait_for
from tests.integration.tpm_commands import nv_script

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or
                                shutil.which("swtpm_setup") is None,
                                reason="needs swtpm and swtpm_setup (swtpm, swtpm-tools)")

STATE = "tpm2-00.permall"
AGAIN = """
M=$(cat /proc/sys/kernel/random/boot_id)
( while true; do got=$(tpm nv_read); echo "TPM-AGAIN $M ${got:12:8} ${got:32:32}"
  sleep 1; done ) &
"""
AGAIN_LINE = re.compile(r"TPM-AGAIN (\S+) (\S+) (\S*)")


def again(log: Path) -> list[tuple[str, str, str]]:
    return [(m[1], m[2], m[3]) for m in AGAIN_LINE.finditer(log.read_text(errors="replace"))]


def swtpms(host) -> list[str]:
    """The command lines of the swtpm processes of host `host` (its run directory)."""
    return [line for line in map(_cmdline, processes_mentioning(f"{host.run_dir}/"))
            if "swtpm" in line.split(" ")[0]]


def test_tpm_guest_moves_live_with_its_state(kr, hosts, tiny_guest):
    kr.env = hosts.env(kr.env)
    value = os.urandom(16)
    run = base64.b64encode((nv_script(value) + AGAIN).encode()).decode()
    profile = kr.profile("tpmm", tiny_guest, memory="128M", tpm=True, kernel={
        "path": str(tiny_guest.kernel), "initrd": str(tiny_guest.initrd),
        "append": f"console={tiny_guest.console} quiet kvmrun.run={run}"})
    a, b = hosts["a"], hosts["b"]
    a_log, b_log = a.run_dir / "tpmm" / "serial.log", b.run_dir / "tpmm" / "serial.log"
    a_state, b_state = a.root / "data" / "tpm" / "tpmm", b.root / "data" / "tpm" / "tpmm"
    kr.ok("-H", "hosta", "define", profile)
    kr.ok("-H", "hosta", "start", "tpmm")
    boot = wait_for(lambda: again(a_log), "the guest reading its NV index")[0][0]
    assert again(a_log)[0] == (boot, "00000000", value.hex())
    assert "TPM-NV-WRITTEN: 00000000,00000000" in a_log.read_text(errors="replace")
    assert len(swtpms(a)) == 1 and swtpms(b) == []
    assert (a_state / STATE).exists() and not b_state.exists()

    # interrupted once the target's swtpm runs: host b is left as it was
    slow = kr.popen("-H", "hosta", "migrate", "tpmm", "--to", "hostb", "--bandwidth", "1")
    target = wait_for(lambda: swtpms(b), "the target's swtpm")
    assert f"dir={b_state},mode=0600" in target[0] and f"{b.run_dir}/tpmm/" in target[0]
    slow.send_signal(signal.SIGINT)
    _, err = slow.communicate(timeout=120)
    assert slow.returncode == 130, err.decode()
    assert swtpms(b) == [] and not b_state.exists()
    assert [p for p in left_on(hosts, "b") if "tpmm" in p] == []
    assert not (b.run_dir / "tpmm").exists()
    seen = len(again(a_log))
    later = wait_for(lambda: again(a_log)[seen:], "a read on host a after the interruption")
    assert later[0] == (boot, "00000000", value.hex())
    assert len(swtpms(a)) == 1

    # live: the TPM state comes along in the stream
    result = json.loads(kr.ok("-H", "hosta", "migrate", "tpmm", "--to", "hostb",
                              "--json").out)
    assert result["mode"] == "live" and result.get("source_undefined") is True, result
    tpms = json.loads(kr.ok("-H", "hostb", "qmp", "tpmm", "query-tpm").out)
    assert [(t["model"], t["options"]["type"]) for t in tpms] == [("tpm-crb", "emulator")]
    launch = json.loads((b.run_dir / "tpmm" / "launch.json").read_text())
    [helper] = launch["helpers"]
    assert f"dir={b_state},mode=0600" in helper["argv"]
    assert helper["socket"].startswith(f"{b.run_dir}/tpmm/")
    assert str(a.root) not in " ".join(helper["argv"])
    seen = len(again(b_log))                  # b's log begins with a's
    moved = wait_for(lambda: again(b_log)[seen:], "a read on host b")
    assert moved[0] == (boot, "00000000", value.hex())      # same boot, same TPM value
    assert b_log.read_text().count(tiny_guest.ready_marker) == 1      # no second boot
    status = json.loads(kr.ok("-H", "hostb", "status", "tpmm", "--json").out)
    assert status["tpm"]["state_dir"] == str(b_state)
    assert [h["name"] for h in status["helpers"]] == ["swtpm"]
    kept = yaml.safe_load(kr.ok("-H", "hostb", "export", "tpmm").out)
    assert kept["tpm"] is True, kept
    assert not a_state.exists()               # undefined on host a, its TPM state too
    assert swtpms(a) == []
    kr.ok("-H", "hostb", "stop", "tpmm")
    assert swtpms(a) == [] and swtpms(b) == []
    assert (b_state / STATE).exists()         # what swtpm there wrote, kept with the VM
    kr.ok("-H", "hostb", "undefine", "tpmm")
    assert not b_state.exists()
