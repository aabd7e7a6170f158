"""Host probing, done once per command and outside the compiler: binaries (QEMU's and the
helpers', virtiofsd and swtpm), /dev/kvm, the QEMU version, firmware files, and what machine
types and CPU models the installed QEMU knows (asked from QEMU itself, cached per binary)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvmrun import arch as archmod
from kvmrun import files, paths, proc
from kvmrun.arch import HostFacts
from kvmrun.errors import HostError
from kvmrun.proc import run
from kvmrun.qemu.kvmprobe import cached_or_probe, kvm_accessible, kvm_verdict

def probe(verify_kvm: bool = False, note=lambda message: None) -> HostFacts:
    """Host facts for the compiler. With verify_kvm, a host with no cached verdict on
    whether guests boot under KVM gets the (cached) boot probe of `kvmrun doctor` first."""
    forced = os.environ.get("KVMRUN_ACCEL") or None
    if forced not in (None, "kvm", "tcg"):
        raise HostError(f"KVMRUN_ACCEL={forced!r} is not kvm or tcg")
    verdict = kvm_verdict()
    if verify_kvm and verdict is None and not forced and kvm_accessible():
        note("kvmrun: checking once whether guests boot under KVM on this host "
             "(cached; see `kvmrun doctor`)")
        verdict = cached_or_probe()
    kvm = kvm_accessible() and (verdict is None or bool(verdict.get("boots")))
    uefi, secure = {}, {}
    for a in archmod.ARCHES.values():
        found = next((c for c in a.uefi_code if os.path.exists(c)), None)
        if found:
            uefi[a.name] = found
        pair = uefi_secure_pair(a.name)
        if pair:
            secure[a.name] = pair[0]
    user = qemu_user()
    binary = proc.which(archmod.get(archmod.host_arch()).qemu) if user else None
    return HostFacts(machine=archmod.host_machine(), kvm=kvm, forced_accel=forced, uefi=uefi,
                     uefi_secure=secure, net_admin=os.geteuid() == 0, qemu_user=user,
                     run_with=bool(binary) and qemu_run_with(binary),
                     virtiofsd=virtiofsd_binary(), swtpm=proc.which("swtpm"))


# QEMU 7.2's C virtiofsd (Debian 12's qemu-system-common), then the Rust one (package
# virtiofsd), which takes the same --socket-path and -o source= options
VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")


def virtiofsd_binary() -> str | None:
    found = next((p for p in VIRTIOFSD if os.access(p, os.X_OK)), None)
    return found or proc.which("virtiofsd")


DEFAULT_QEMU_USER = "kvmrun"


def qemu_user() -> str | None:
    """The user QEMU drops to when kvmrun runs as root: KVMRUN_QEMU_USER, else the
    `kvmrun` system user (made at the first start, `ensure_qemu_user`). None when kvmrun is
    not root (QEMU runs as the caller) or when KVMRUN_QEMU_USER=root keeps QEMU root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("KVMRUN_QEMU_USER") or DEFAULT_QEMU_USER
    if name == "root":
        return None
    import pwd
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if name == DEFAULT_QEMU_USER:
            return name                          # made on demand when a guest starts
        raise HostError(f"KVMRUN_QEMU_USER={name!r}: no such user",
                        hint="create it (useradd --system --no-create-home --shell "
                             "/usr/sbin/nologin kvmrun) or unset the variable") from None
    if entry.pw_uid == 0:
        raise HostError(f"KVMRUN_QEMU_USER={name!r} is root (uid 0)",
                        hint="KVMRUN_QEMU_USER=root keeps QEMU root on purpose")
    return name


def ensure_qemu_user(name: str, note=lambda message: None) -> None:
    """Make the default `kvmrun` system user when it does not exist yet (no home, no
    login shell), saying so."""
    import pwd
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
            "--comment", "QEMU guests of kvmrun", name]
    import shlex
    note(f"kvmrun: creating the system user {name!r} QEMU runs as: {shlex.join(argv)} "
         f"(KVMRUN_QEMU_USER names another user; KVMRUN_QEMU_USER=root keeps QEMU root)")
    done = run(argv, check=False, timeout=60)
    if done.returncode != 0 and name not in {e.pw_name for e in pwd.getpwall()}:
        raise HostError(f"cannot create the user {name!r} QEMU should run as: "
                        f"{(done.stderr or done.stdout).strip() or 'useradd failed'}",
                        hint="create it yourself, name another with KVMRUN_QEMU_USER, "
                             "or keep QEMU root with KVMRUN_QEMU_USER=root")


def user_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def qemu_run_with(binary: str) -> bool:
    """Whether QEMU drops privileges with `-run-with user=` (9.1 deprecated `-runas` for
    it; 7.2 has only `-runas`): asked from its -help."""
    def compute():
        return bool(re.search(r"-run-with[^\n]*user=", _ask_qemu(binary, "-help")))
    return bool(_cached(binary, "run-with", compute))


def uefi_vars_template(arch_name: str, secure_boot: bool = False) -> str | None:
    """The variable store a new VM starts from: with Secure Boot, the one with Microsoft's
    keys enrolled that matches the Secure Boot code."""
    if secure_boot:
        pair = uefi_secure_pair(arch_name)
        return pair[1] if pair else None
    a = archmod.get(arch_name)
    return next((v for v in a.uefi_vars if os.path.exists(v)), None)


def uefi_secure_pair(arch_name: str) -> tuple[str, str] | None:
    """(Secure Boot code, enrolled variable store): the first pair installed."""
    a = archmod.get(arch_name)
    return next(((c, v) for c, v in a.uefi_secure if os.path.exists(c) and os.path.exists(v)),
                None)


def qemu_binary(arch_name: str) -> str:
    """The full path of the QEMU binary for an architecture, or a HostError with a fix."""
    a = archmod.get(arch_name)
    found = proc.which(a.qemu)
    if not found:
        raise HostError(f"{a.qemu} not found on PATH",
                        hint=f"install it: apt-get install {a.package}")
    return found


def _ask_qemu(binary: str, *args: str) -> str:
    return run([binary, *args], check=False, timeout=30).stdout


def _cached(binary: str, what: str, compute) -> object:
    st = os.stat(binary)
    key = f"{Path(binary).name}-{st.st_size}-{int(st.st_mtime)}-{what}.json"
    cache = paths.cache_dir() / "qemu" / key
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        files.write_json(cache, value, 0o644, make_dirs=0o755)
    except OSError:
        pass                 # a read-only cache only costs speed
    return value


def qemu_version(binary: str) -> str:
    def compute():
        m = re.search(r"version (\d+\.\d+\.\d+)", _ask_qemu(binary, "--version"))
        return m.group(1) if m else "unknown"
    return _cached(binary, "version", compute)


def qemu_machines(binary: str) -> list[str]:
    """Machine type names and aliases the binary supports."""
    def compute():
        names = []
        for line in _ask_qemu(binary, "-machine", "help").splitlines()[1:]:
            m = re.match(r"(\S+)\s+(.*)", line)
            if m:
                names.append(m.group(1))
                alias = re.search(r"\(alias of (\S+)\)", m.group(2))
                if alias:
                    names.append(alias.group(1))
        return sorted(set(names))
    return _cached(binary, "machines", compute)


def machine_version(binary: str, machine: str) -> str:
    """The versioned machine type behind `machine` (`pc` -> `pc-i440fx-7.2`); itself when
    it is no alias (or QEMU cannot be asked)."""
    def compute():
        aliases = {}
        for line in _ask_qemu(binary, "-machine", "help").splitlines()[1:]:
            m = re.match(r"(\S+)\s+.*\(alias of (\S+)\)", line)
            if m:
                aliases[m.group(1)] = m.group(2)
        return aliases
    try:
        return _cached(binary, "machine-aliases", compute).get(machine, machine)
    except (HostError, OSError):
        return machine


def qemu_cpus(binary: str) -> list[str]:
    """CPU model names the binary supports (x86 prints `x86 NAME`, s390x `s390 NAME`, ppc
    `PowerPC NAME`, others `  NAME`)."""
    def compute():
        names = {"host", "max"}
        for line in _ask_qemu(binary, "-cpu", "help").splitlines():
            if line.lower().startswith("recognized"):
                break                       # x86 lists CPUID flags after the models
            words = line.split()
            if not words or line.rstrip().endswith(":"):
                continue
            prefixed = words[0] in ("x86", "s390", "PowerPC") and len(words) > 1
            names.add(words[1] if prefixed else words[0])
        return sorted(names)
    return _cached(binary, "cpus-v2", compute)     # v2: s390/PowerPC prefixes
