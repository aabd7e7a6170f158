"""TPM 2.0 (`tpm: true`) and the guest's helper daemons, with the tiny guest and the real swtpm
and virtiofsd.

One guest is booted twice with the same profile: its init runs tests/integration/
tpm_commands.py's snippet, which talks raw TPM 2.0 to /dev/tpm0. The first boot finds no NV
index and defines and writes one; the second reads back what the first wrote: the TPM state
(swtpm's, in the data directory) survived the restart. QMP's query-tpm is the oracle for the
device, and after each stop no helper is left running. Then the state moves with export /
import. A helper that fails to start leaves nothing behind (no QEMU, no other helper, no run
directory)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import pytest

from tests.integration.conftest import parent_of
from tests.integration.tpm_commands import nv_script

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or
                                shutil.which("swtpm_setup") is None,
                                reason="needs swtpm and swtpm_setup (swtpm, swtpm-tools)")

STATE = "tpm2-00.permall"


def tpm_profile(kr, guest, value: bytes):
    run = base64.b64encode(nv_script(value).encode()).decode()
    return kr.profile("tpm", guest, tpm=True, kernel={
        "path": str(guest.kernel), "initrd": str(guest.initrd),
        "append": f"console={guest.console} quiet kvmrun.run={run}"})


def tpm_lines(kr) -> list[str]:
    log = (kr.guest_dir("tpm") / "serial.log").read_text(errors="replace")
    return [line.strip() for line in log.splitlines() if line.startswith("TPM-")]


def test_tpm_state_survives_a_restart_and_moves_with_export(kr, tiny_guest):
    value = os.urandom(16)
    profile = tpm_profile(kr, tiny_guest, value)
    kr.start(profile)
    assert tpm_lines(kr) == ["TPM-VERSION: 2", "TPM-NV-WRITTEN: 00000000,00000000"]
    tpms = json.loads(kr.ok("qmp", "tpm", "query-tpm").out)
    assert [(t["model"], t["options"]["type"]) for t in tpms] == [("tpm-crb", "emulator")]
    status = kr.status("tpm")
    state_dir = kr.base / "data" / "tpm" / "tpm"
    assert status["tpm"]["state_dir"] == str(state_dir)
    assert [h["name"] for h in status["helpers"]] == ["swtpm"]
    assert f"tpm      TPM 2.0 (swtpm), state in {state_dir}" in kr.ok("status", "tpm").out
    kr.ok("stop", "tpm")
    assert kr.our_processes() == {}                   # swtpm ended with QEMU
    assert oct((state_dir / STATE).stat().st_mode & 0o777) == "0o600"

    kr.start(profile)                                 # the same profile, started again
    assert tpm_lines(kr) == ["TPM-VERSION: 2", f"TPM-NV: {value.hex()}"]
    # the quick start's forked supervisor handed over to a lean one, which adopted QEMU
    # and swtpm: it is the parent of both
    state = kr.status("tpm")
    supervisor = state["supervisor_pid"]
    argv = open(f"/proc/{supervisor}/cmdline", "rb").read().split(b"\0")
    assert argv[argv.index(b"--adopt") + 1] == str(state["pid"]).encode()
    swtpm = state["helpers"][0]["pid"]
    assert parent_of(swtpm) == parent_of(state["pid"]) == supervisor
    kr.ok("stop", "tpm")
    assert kr.our_processes() == {}

    kr.ok("define", profile)
    archive = kr.base / "tpm.tar"
    kr.ok("export", "tpm", "--with-disks", "-o", archive)
    listing = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing == ["manifest.json", "profile.yaml", f"tpm/{STATE}"]
    kr.ok("import", archive, "--name", "moved")
    moved = kr.base / "data" / "tpm" / "moved" / STATE
    assert moved.read_bytes() == (state_dir / STATE).read_bytes()
    assert oct(moved.stat().st_mode & 0o777) == "0o600"
    kr.ok("undefine", "moved")
    assert not moved.parent.exists()                  # the TPM state went with the VM


def test_a_helper_that_fails_leaves_nothing_behind(kr, tiny_guest):
    """virtiofsd0 comes up, virtiofsd1 exits (its source is a file): the start fails with
    virtiofsd's own words, and virtiofsd0 is ended before anything else starts."""
    (kr.base / "good").mkdir()
    (kr.base / "afile").write_text("not a directory\n")
    profile = kr.profile("fs", tiny_guest, shares=[
        {"path": "good", "tag": "good", "type": "virtiofs"},
        {"path": "afile", "tag": "bad", "type": "virtiofs"}])
    result = kr.run("start", profile)
    log = kr.guest_dir("fs") / "helper-virtiofsd1.log"
    assert result.code == 7, result
    assert result.err.startswith(
        f"kvmrun: error: fs failed to start: helper virtiofsd1 (virtiofsd) exited with "
        f"status 1 while starting; its log: {log}\n  virtiofsd said: source is not a "
        "directory\n  command: /usr/lib/qemu/virtiofsd --socket-path="), result
    assert kr.our_processes() == {}                   # virtiofsd0 was ended, QEMU never ran
    assert not kr.guest_dir("fs").exists()
