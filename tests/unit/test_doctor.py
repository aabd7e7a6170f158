"""`kvmrun doctor` on this host: one finding per check, as JSON, and the helper daemons'
binaries (virtiofsd, swtpm) among them, found where the host has them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from kvmrun.qemu import host


def test_doctor_json_names_the_helper_daemons(tmp_path):
    env = {"PATH": os.environ["PATH"], "KVMRUN_RUN_DIR": str(tmp_path / "run"),
           "KVMRUN_CONFIG_DIR": str(tmp_path / "cfg"), "KVMRUN_CACHE_DIR": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-m", "kvmrun", "doctor", "--json", "--no-probe"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 3), done.stderr
    found = {f["check"]: f for f in json.loads(done.stdout)}
    virtiofsd, swtpm = host.virtiofsd_binary(), shutil.which("swtpm")
    row = found["virtiofsd (virtiofs shares)"]
    assert (row["ok"], row["detail"]) == ((True, virtiofsd) if virtiofsd
                                          else (None, "not installed"))
    row = found["swtpm (tpm: true)"]
    assert (row["ok"], row["detail"]) == ((True, swtpm) if swtpm else (None, "not installed"))
    assert row["hint"] == (None if swtpm else "apt-get install swtpm swtpm-tools")


def test_the_kvm_boot_probe_says_what_it_saw(tmp_path):
    """The probe behind doctor's "kvm boot probe" line, on real QEMU: a file that is no
    kernel boots nothing, and the verdict says why (QEMU's own error, or no usable KVM)."""
    from kvmrun.qemu import kvmprobe
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"not a kernel\n" * 100)
    verdict = kvmprobe.kvm_boot_probe(str(not_a_kernel))
    assert verdict["boots"] is False, verdict
    assert verdict["kernel"] == str(not_a_kernel)
    assert verdict["detail"].startswith(("QEMU exited (", "QEMU or /dev/kvm not usable")), \
        verdict
