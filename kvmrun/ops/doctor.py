"""`kvmrun doctor`: what a user needs to know before the first VM, each finding with a fix
(including the KVM boot probe of kvmrun.qemu.kvmprobe)."""

from __future__ import annotations

import os
from pathlib import Path

from kvmrun import arch as archmod
from kvmrun import paths, proc
from kvmrun.qemu import host
from kvmrun.qemu.kvmprobe import KVM_DEVICE, cached_or_probe, kvm_accessible

FIRMWARE = {
    "ovmf (x86_64 UEFI)": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    "ovmf secboot (x86_64)": ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "ovmf"),
    "AAVMF (aarch64 UEFI)": ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64"),
    "OpenSBI (riscv64)": ("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
                          "opensbi"),
    "U-Boot (riscv64)": ("/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf", "u-boot-qemu"),
}


def _finding(check: str, ok: bool | None, detail: str, hint: str | None = None) -> dict:
    """ok: True fine, False a problem, None a warning or information."""
    return {"check": check, "ok": ok, "detail": detail, "hint": hint}


def findings(probe: bool = True, force_probe: bool = False) -> list[dict]:
    out = []
    for a in archmod.ARCHES.values():
        binary = proc.which(a.qemu)
        if binary:
            out.append(_finding(f"qemu {a.name}", True,
                                f"{binary} (QEMU {host.qemu_version(binary)})"))
        elif a.name in ("x86_64", "aarch64", "arm", "riscv64"):
            out.append(_finding(f"qemu {a.name}", None, f"{a.qemu} not installed",
                                "apt-get install qemu-system-x86 qemu-system-arm "
                                "qemu-system-misc"))
    qemu_img = proc.which("qemu-img")
    out.append(_finding("qemu-img", bool(qemu_img), qemu_img or "not installed",
                        None if qemu_img else "apt-get install qemu-utils"))
    if not os.path.exists(KVM_DEVICE):
        out.append(_finding("/dev/kvm", None, "absent: guests run under TCG (slow)",
                            "enable virtualisation in the firmware, load kvm_intel/kvm_amd"))
    elif not kvm_accessible():
        out.append(_finding("/dev/kvm", False, "present but not usable by this user",
                            "add yourself to the kvm group: usermod -aG kvm $USER"))
    else:
        out.append(_finding("/dev/kvm", True, "present and usable"))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    nested_host = " hypervisor" in cpuinfo
    out.append(_finding("nested", None,
                        "this host is itself a VM (nested virtualisation)" if nested_host
                        else "this host is not a VM"))
    if probe and kvm_accessible():
        verdict = cached_or_probe(force_probe)
        out.append(_finding("kvm boot probe", verdict.get("boots"),
                            verdict["detail"],
                            None if verdict.get("boots") else
                            "kvmrun uses TCG for `accel: auto`; KVMRUN_ACCEL=kvm forces KVM"))
    for label, (path, package) in FIRMWARE.items():
        there = os.path.exists(path)
        out.append(_finding(f"firmware {label}", True if there else None,
                            path if there else "not installed",
                            None if there else f"apt-get install {package}"))
    virtiofsd, swtpm = host.virtiofsd_binary(), proc.which("swtpm")
    out.append(_finding("virtiofsd (virtiofs shares)", True if virtiofsd else None,
                        virtiofsd or "not installed",
                        None if virtiofsd else "apt-get install qemu-system-common"))
    out.append(_finding("swtpm (tpm: true)", True if swtpm else None, swtpm or "not installed",
                        None if swtpm else "apt-get install swtpm swtpm-tools"))
    for label, directory in (("run dir", paths.run_dir()), ("config dir", paths.config_dir())):
        probe_dir = directory
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        writable = os.access(probe_dir, os.W_OK)
        out.append(_finding(label, writable, str(directory),
                            None if writable else f"make {directory} writable or set "
                                                  "KVMRUN_RUN_DIR / KVMRUN_CONFIG_DIR"))
    longest = paths.RunPaths.for_guest("x" * 64).qmp_cli
    headroom = paths.UNIX_PATH_MAX - len(os.fsencode(longest))
    out.append(_finding("socket paths", headroom >= 0,
                        f"{headroom} bytes to spare with a 64-character VM name",
                        None if headroom >= 0 else "use a shorter run directory"))
    return out
