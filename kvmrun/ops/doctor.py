"""`kvmrun doctor`: what a user needs to know before the first VM, each finding with a fix.

It includes a boot probe under KVM: on nested hosts /dev/kvm opens and QEMU reports KVM
enabled, yet a Linux guest can hang early in boot. The probe boots a kernel with no root
file system under KVM; a healthy host reaches the kernel's panic (and QEMU exits, thanks to
-no-reboot and panic=-1) within seconds. The verdict is cached per host boot, and
`accel: auto` honours it.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kvmrun import arch as archmod
from kvmrun import host, paths

PROBE_TIMEOUT = 15.0
FIRMWARE = {
    "ovmf (x86_64 UEFI)": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    "AAVMF (aarch64 UEFI)": ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64"),
    "OpenSBI (riscv64)": ("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
                          "opensbi"),
    "U-Boot (riscv64)": ("/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf", "u-boot-qemu"),
}


def _finding(check: str, ok: bool | None, detail: str, hint: str | None = None) -> dict:
    """ok: True fine, False a problem, None a warning or information."""
    return {"check": check, "ok": ok, "detail": detail, "hint": hint}


def probe_kernel() -> str | None:
    """A Linux kernel to boot for the probe: the host's, else a cached test-guest kernel."""
    candidates = [f"/boot/vmlinuz-{platform.release()}", *sorted(glob.glob("/boot/vmlinuz-*"))]
    cache = os.environ.get("KVMRUN_GUEST_CACHE") or str(Path.home() / ".cache/kvmrun/guest")
    candidates += sorted(glob.glob(f"{cache}/x86_64-*/vmlinuz"))
    return next((c for c in candidates if os.access(c, os.R_OK)), None)


def kvm_boot_probe(kernel: str | None = None) -> dict:
    """Boot `kernel` under KVM with no root fs; record whether it got far enough."""
    kernel = kernel or probe_kernel()
    verdict = {"boot_id": host.boot_id(), "at": time.time(), "kernel": kernel}
    if kernel is None:
        return {**verdict, "boots": None, "detail": "no kernel to boot for the probe"}
    binary = shutil.which("qemu-system-x86_64")
    if binary is None or not host.kvm_accessible():
        return {**verdict, "boots": False, "detail": "QEMU or /dev/kvm not usable"}
    with tempfile.TemporaryDirectory(prefix="kvmrun-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = [binary, "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-serial",
                f"file:{log}", "-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=PROBE_TIMEOUT)
            code, stderr = proc.returncode, proc.stderr.decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            code, stderr = None, ""
        took = round(time.monotonic() - started, 1)
        text = log.read_text(errors="replace") if log.exists() else ""
    reached = "Kernel panic" in text or "VFS:" in text
    last = text.strip().splitlines()[-1][:120] if text.strip() else ""
    if reached:
        detail = f"a Linux kernel booted under KVM in {took}s"
    elif code is None:
        detail = (f"a Linux kernel hung under KVM (no progress in {PROBE_TIMEOUT:g}s; "
                  f"last console line: {last!r}) — typical of nested virtualisation")
    else:
        detail = f"QEMU exited ({code}) under KVM: {stderr[-300:] or last}"
    return {**verdict, "boots": reached, "detail": detail, "seconds": took}


def cached_or_probe(force: bool = False) -> dict:
    verdict = None if force else host.kvm_verdict()
    if verdict is None:
        verdict = kvm_boot_probe()
        if verdict.get("boots") is not None:
            try:
                path = host.kvm_verdict_file()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(verdict))
            except OSError:
                pass
    return verdict


def findings(probe: bool = True, force_probe: bool = False) -> list[dict]:
    out = []
    for a in archmod.ARCHES.values():
        binary = shutil.which(a.qemu)
        if binary:
            out.append(_finding(f"qemu {a.name}", True,
                                f"{binary} (QEMU {host.qemu_version(binary)})"))
        elif a.name in ("x86_64", "aarch64", "arm", "riscv64"):
            out.append(_finding(f"qemu {a.name}", None, f"{a.qemu} not installed",
                                "apt-get install qemu-system-x86 qemu-system-arm "
                                "qemu-system-misc"))
    qemu_img = shutil.which("qemu-img")
    out.append(_finding("qemu-img", bool(qemu_img), qemu_img or "not installed",
                        None if qemu_img else "apt-get install qemu-utils"))
    if not os.path.exists(host.KVM_DEVICE):
        out.append(_finding("/dev/kvm", None, "absent: guests run under TCG (slow)",
                            "enable virtualisation in the firmware, load kvm_intel/kvm_amd"))
    elif not host.kvm_accessible():
        out.append(_finding("/dev/kvm", False, "present but not usable by this user",
                            "add yourself to the kvm group: usermod -aG kvm $USER"))
    else:
        out.append(_finding("/dev/kvm", True, "present and usable"))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    nested_host = " hypervisor" in cpuinfo
    out.append(_finding("nested", None,
                        "this host is itself a VM (nested virtualisation)" if nested_host
                        else "this host is not a VM"))
    if probe and host.kvm_accessible():
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
