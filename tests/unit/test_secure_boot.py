"""Secure Boot without a guest: the installed variable-store templates read as enrolled or
not, and a start with Secure Boot warns when the VM's existing store has no keys (a store made
for plain UEFI). The boot itself is tests/integration/test_secure_boot.py's."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from kvmrun import paths
from kvmrun.ops import launch
from kvmrun.profile import load
from kvmrun.qemu import varstore

PLAIN = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
ENROLLED = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
needs_ovmf = pytest.mark.skipif(not (PLAIN.exists() and ENROLLED.exists()),
                                reason="ovmf is not installed")


@needs_ovmf
def test_the_templates_read_as_they_were_made(tmp_path):
    assert varstore.platform_key_enrolled(ENROLLED)
    assert not varstore.platform_key_enrolled(PLAIN)
    aavmf = Path("/usr/share/AAVMF/AAVMF_VARS.ms.fd")
    if aavmf.exists():
        assert varstore.platform_key_enrolled(aavmf)


@needs_ovmf
def test_a_deleted_platform_key_is_not_enrolled(tmp_path):
    """What the firmware leaves when the OS clears PK: the variable's State byte marks it
    deleted (edk2's VAR_DELETED & VAR_ADDED)."""
    data = bytearray(ENROLLED.read_bytes())
    header = data.find(varstore.PK) - varstore.GUID_OFFSET
    assert struct.unpack_from("<H", data, header)[0] == varstore.START_ID
    data[header + 2] = 0x3C
    store = tmp_path / "VARS.fd"
    store.write_bytes(bytes(data))
    assert not varstore.platform_key_enrolled(store)


@needs_ovmf
@pytest.mark.parametrize("template, warned", [(PLAIN, True), (ENROLLED, False)])
def test_a_store_without_keys_is_a_warning_at_start(tmp_path, monkeypatch, template, warned):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMRUN_ACCEL", "tcg")
    (tmp_path / "vm.yaml").write_text("name: vm\narch: x86_64\nfirmware: uefi-secure\n"
                                      "network: []\n")
    store = paths.nvram_path("vm")
    store.parent.mkdir(parents=True)
    shutil.copyfile(template, store)
    notes: list[str] = []
    launch.prepare(load(tmp_path / "vm.yaml"), notes.append)
    expected = (f"kvmrun: warning: vm's UEFI variable store {store} has no Secure Boot keys "
                "(it was made for plain UEFI), so the firmware verifies nothing; remove it "
                "while the VM is stopped to start from Microsoft's keys")
    assert (expected in notes) is warned, notes
