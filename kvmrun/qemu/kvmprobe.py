"""The KVM boot probe: on nested hosts /dev/kvm opens and QEMU reports KVM enabled, yet a
Linux guest can hang early in boot. The probe boots a kernel with no root file system under
KVM; a healthy host reaches the kernel's panic (and QEMU exits, thanks to -no-reboot and
panic=-1) within seconds. The verdict is cached per host boot, and `accel: auto` honours it
(`kvmrun doctor` shows it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kvmrun import files, paths, proc
from kvmrun.proc import boot_id

PROBE_TIMEOUT = 15.0
KVM_DEVICE = "/dev/kvm"


def kvm_accessible() -> bool:
    return os.path.exists(KVM_DEVICE) and os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def kvm_verdict_file() -> Path:
    return paths.cache_dir() / "kvm-verdict.json"


def kvm_verdict() -> dict | None:
    """The cached result of `kvmrun doctor`'s boot probe under KVM for this boot of the host."""
    try:
        verdict = json.loads(kvm_verdict_file().read_text())
    except (OSError, ValueError):
        return None
    return verdict if verdict.get("boot_id") == boot_id() else None


def probe_kernel() -> str | None:
    """A Linux kernel to boot for the probe: the host's, else a cached test-guest kernel."""
    import glob
    import platform
    candidates = [f"/boot/vmlinuz-{platform.release()}", *sorted(glob.glob("/boot/vmlinuz-*"))]
    cache = os.environ.get("KVMRUN_GUEST_CACHE") or str(Path.home() / ".cache/kvmrun/guest")
    candidates += sorted(glob.glob(f"{cache}/x86_64-*/vmlinuz"))
    return next((c for c in candidates if os.access(c, os.R_OK)), None)


def kvm_boot_probe(kernel: str | None = None) -> dict:
    """Boot `kernel` under KVM with no root fs; record whether it got far enough."""
    import subprocess        # the probe's imports stay here: the quick start reads only
    import tempfile          # kvm_accessible and the verdict file's stamp
    kernel = kernel or probe_kernel()
    verdict = {"boot_id": boot_id(), "at": time.time(), "kernel": kernel}
    if kernel is None:
        return {**verdict, "boots": None, "detail": "no kernel to boot for the probe"}
    binary = proc.which("qemu-system-x86_64")
    if binary is None or not kvm_accessible():
        return {**verdict, "boots": False, "detail": "QEMU or /dev/kvm not usable"}
    with tempfile.TemporaryDirectory(prefix="kvmrun-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = [binary, "-accel", "kvm", "-cpu", "host", "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-serial",
                f"file:{log}", "-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
        started = time.monotonic()
        try:
            ran = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=PROBE_TIMEOUT)
            code, stderr = ran.returncode, ran.stderr.decode(errors="replace").strip()
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
    verdict = None if force else kvm_verdict()
    if verdict is None:
        verdict = kvm_boot_probe()
        if verdict.get("boots") is not None:
            try:
                files.write_json(kvm_verdict_file(), verdict, 0o644, make_dirs=0o755)
            except OSError:
                pass
    return verdict


