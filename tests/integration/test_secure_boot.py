"""Secure Boot with a real signed chain: Debian's shim (signed by Microsoft), Debian's signed
grub and Debian's signed kernel on an ESP image (tests/guest/esp.py), booted by OVMF's Secure
Boot build with Microsoft's keys enrolled (`firmware: uefi-secure`). Two boots in all: the
signed chain reaches Linux, which reports Secure Boot on; the same chain with the kernel's
signature stripped stops at grub, whose shim verifier refuses the kernel.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

READY = "KVMRUN-GUEST-READY"
# grub's `boot` after a refused `linux`: no kernel was loaded, so Linux cannot start
NO_KERNEL = "you need to load the kernel first"


def esp_image(guest, signed: bool):
    from tests.guest.build import GuestBuildError
    from tests.guest.esp import build_esp
    try:
        return build_esp(guest, signed)
    except GuestBuildError as err:
        pytest.skip(f"cannot build the ESP image: {err}")


def secure_profile(kr, guest, name: str, esp, ready: str):
    """The tiny guest's kernel and initramfs, booted from the ESP by the firmware (no direct
    kernel boot); the ESP is read-only, so the cached image stays as built. At 256 MiB the
    kernel's EFI stub fails to decompress it ("Failed to decompress kernel")."""
    return kr.profile(name, guest, kernel=None, firmware="uefi-secure",
                      disks=[{"path": str(esp), "format": "raw", "readonly": True}],
                      memory="512M", ready={"console": ready, "timeout": 300})


def qmp(kr, name: str, command: str, **arguments):
    return json.loads(kr.ok("qmp", name, command, json.dumps(arguments)).out)


def test_the_signed_chain_boots_with_secure_boot_on(kr, tiny_guest):
    esp = esp_image(tiny_guest, signed=True)
    store = kr.base / "data" / "nvram" / "sb_VARS.fd"
    assert not store.exists()
    kr.start(secure_profile(kr, tiny_guest, "sb", esp, READY))

    log = (kr.guest_dir("sb") / "serial.log").read_text(errors="replace")
    assert "Welcome to GRUB" in log                  # shim verified and started grub
    assert "EFI stub: UEFI Secure Boot is enabled." in log
    assert "secureboot: Secure boot enabled" in log  # Linux's own verdict
    assert "Kernel is locked down from EFI Secure Boot" in log

    # QEMU is the oracle: the Secure Boot code, the VM's own store, SMM, a secure pflash
    info = kr.status("sb")
    assert (info["firmware"], info["secure_boot"]) == ("uefi", True)
    assert "firmware uefi, Secure Boot on" in kr.ok("status", "sb").out
    blocks = {b["device"]: b["inserted"] for b in qmp(kr, "sb", "query-block")
              if b.get("inserted")}
    assert blocks["pflash0"]["file"] == "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    assert blocks["pflash0"]["ro"] is True
    assert blocks["pflash1"]["file"] == str(store) and store.exists()
    assert qmp(kr, "sb", "qom-get", path="/machine", property="smm") == "on"
    for unit in (0, 1):
        assert qmp(kr, "sb", "qom-get", path=f"/machine/system.flash{unit}",
                   property="secure") is True
    kr.ok("kill", "sb")


def test_an_unsigned_kernel_is_refused(kr, tiny_guest):
    esp = esp_image(tiny_guest, signed=False)
    kr.start(secure_profile(kr, tiny_guest, "sbx", esp, f"{NO_KERNEL}|{READY}"))
    log = (kr.guest_dir("sbx") / "serial.log").read_text(errors="replace")
    assert "Welcome to GRUB" in log
    assert "error: bad shim signature." in log      # grub's shim_lock verifier said no
    assert NO_KERNEL in log
    assert READY not in log and "Linux version" not in log
    kr.ok("kill", "sbx")
