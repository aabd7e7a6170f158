"""libvirt domain XML -> a kvmrun profile mapping, with every loss listed.

`convert(raw, source)` returns a `Conversion`: `data` (a plain mapping that
`kvmrun.profile.from_mapping` validates; its line map points at the XML lines), `losses`
(what kvmrun cannot do, one Finding each with its XML path: the import refuses them unless
--lossy), `notes` (what was approximated: written as a comment block above the YAML) and
`nvram` (a UEFI variable store to copy when the VM is defined).

Refusals (a ProfileError with file and line, exit 2): not XML, a DTD or entity, not a
<domain>, a hypervisor other than QEMU/KVM, an architecture kvmrun does not run.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from kvmrun import arch as archmod
from kvmrun.errors import Location, ProfileError
from kvmrun.libvirt import _xml
from kvmrun.libvirt._xml import Finding, Node

KVMRUN_NS = "https://kvmrun.dev/libvirt/profile/1"     # exported kvmrun-only keys
MiB = 1024 * 1024
UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000 ** 2,
         "m": MiB, "mib": MiB, "gb": 1000 ** 3, "g": 1024 ** 3, "gib": 1024 ** 3,
         "tb": 1000 ** 4, "t": 1024 ** 4, "tib": 1024 ** 4}
# top-level elements kvmrun has no counterpart for, with the reason shown
UNSUPPORTED = {
    "cputune": "vCPU pinning and CPU tuning are not supported",
    "numatune": "NUMA memory placement is not supported",
    "memoryBacking": "hugepages and shared or locked memory are not supported",
    "iothreads": "I/O threads are not supported",
    "blkiotune": "block I/O tuning is not supported",
    "memtune": "memory limits are not supported",
    "sysinfo": "SMBIOS system information is not supported",
    "seclabel": "security labels (SELinux/AppArmor) are not supported",
    "resource": "cgroup partitions are not supported",
}
MACHINE_FAMILIES = ((r"pc-q35-.*", "q35"), (r"pc-i440fx-.*|pc-\d.*", "pc"),
                    (r"(virt|pseries|s390-ccw-virtio)-\d.*", None))


@dataclass
class Conversion:
    data: dict
    lines: dict
    source: str
    losses: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    nvram: str | None = None            # a UEFI variable store to copy when defining
    missing: list[Finding] = field(default_factory=list)   # paths not found on this host

    def problems(self, check_files: bool = True) -> list[Finding]:
        """What blocks an exact import: the losses, and missing paths unless not checked."""
        return self.losses + (self.missing if check_files else [])

    def profile(self, overrides=()):
        from kvmrun.profile import from_mapping
        return from_mapping(self.data, self.lines, self.source, overrides)


class Builder:
    """Collects the profile mapping, its line map and the findings while the tree is read."""

    def __init__(self, source: str, path_exists: Callable[[str], bool],
                 pool_exists: Callable[[str], bool]):
        self.source = source
        self.data: dict[str, Any] = {}
        self.lines: dict[tuple, tuple[str, int]] = {}
        self.losses: list[Finding] = []
        self.notes: list[Finding] = []
        self.missing: list[Finding] = []
        self.path_exists = path_exists
        self.pool_exists = pool_exists
        self.nvram: str | None = None
        self.arch: str | None = None

    def set(self, key: tuple, value: Any, node: Node | None) -> None:
        target = self.data
        for part in key[:-1]:
            target = target.setdefault(part, {})
        target[key[-1]] = value
        if node is not None:
            self.lines[key] = (self.source, node.line)

    def loss(self, node: Node, message: str, attr: str | None = None) -> None:
        path = (node.path or "domain") + (f"/@{attr}" if attr else "")
        self.losses.append(Finding(path, node.line, message))

    def drop(self, node: Node, message: str) -> None:
        """A loss of the whole element: nothing under it is reported again."""
        _xml.consume(node)
        self.loss(node, message)

    def check_path(self, node: Node, path: str, what: str) -> None:
        if not self.path_exists(path):
            self.missing.append(Finding(node.path, node.line, f"{what} {path} not found on "
                                                               "this host"))

    def note(self, node: Node, message: str) -> None:
        self.notes.append(Finding(node.path or "domain", node.line, message))

    def refuse(self, node: Node, message: str, hint: str | None = None) -> None:
        raise ProfileError(Location(self.source, line=node.line), message, hint)


def convert(raw: bytes, source: str, *, path_exists: Callable[[str], bool] = os.path.exists,
            pool_exists: Callable[[str], bool] | None = None) -> Conversion:
    """Map a libvirt domain definition (bytes of XML) onto a kvmrun profile mapping."""
    if pool_exists is None:
        from kvmrun.libvirt._today import pool_exists
    root = _xml.parse(raw, source)
    b = Builder(source, path_exists, pool_exists)
    root.use()
    _hypervisor(b, root)
    _identity(b, root)
    _memory(b, root)
    _vcpus(b, root)
    _os(b, root)
    _features(b, root)
    _cpu(b, root)
    _clock_and_events(b, root)
    from kvmrun.libvirt import devices
    devices.convert(b, root)
    _commandline(b, root)
    _metadata(b, root)
    for node in root.children:
        if not node.used and node.tag in UNSUPPORTED:
            b.drop(node, UNSUPPORTED[node.tag])
    losses, notes = _xml.leftovers(root)
    return Conversion(b.data, b.lines, source, b.losses + losses, b.notes + notes, b.nvram,
                      b.missing)


# ---------------------------------------------------------------- the domain itself

def _hypervisor(b: Builder, root: Node) -> None:
    kind = root.attr("type")
    if kind not in ("kvm", "qemu"):
        b.refuse(root, f"domain type {kind!r}: kvmrun runs QEMU and KVM guests only"
                 if kind else "the <domain> has no type (kvm or qemu)")
    b.set(("accel",), "kvm" if kind == "kvm" else "tcg", root)
    root.attr("id")                      # a running domain's id: meaningless when defined


def _identity(b: Builder, root: Node) -> None:
    name = root.find("name")
    if name is None:
        b.refuse(root, "the domain has no <name>")
    b.set(("name",), name.value(), name)
    uuid = root.find("uuid")
    if uuid is not None:
        b.set(("uuid",), uuid.value().lower(), uuid)
    text = [n.value() for n in (root.find("title"), root.find("description")) if n is not None]
    if any(text):
        first = root.find("title") or root.find("description")
        b.set(("description",), "\n".join(t for t in text if t), first)


def _bytes(b: Builder, node: Node) -> int | None:
    unit = (node.attr("unit") or "KiB").lower()
    text = node.value()
    if unit not in UNITS or not text.isdigit():
        b.loss(node, f"{text!r} {node.attrs.get('unit', 'KiB')} is not a size")
        return None
    return int(text) * UNITS[unit]


def _memory(b: Builder, root: Node) -> None:
    mem = root.find("memory")
    if mem is None:
        b.refuse(root, "the domain has no <memory>")
    size = _bytes(b, mem)
    mem.attr("dumpCore")
    if size is None:
        return
    mib = math.ceil(size / MiB)
    if mib * MiB != size:
        b.note(mem, f"{size // 1024} KiB rounded up to {mib} MiB (as libvirt does)")
    b.set(("memory",), mib, mem)
    current = root.find("currentMemory")
    if current is not None:
        cur = _bytes(b, current)
        if cur is not None and math.ceil(cur / MiB) != mib:
            b.note(current, f"the balloon target ({cur // MiB} MiB) is not kept: the guest "
                            f"starts with all {mib} MiB")
    peak = root.find("maxMemory")
    if peak is not None:
        peak.use()
        b.loss(peak, "memory hotplug (maxMemory) is not supported")


def _vcpus(b: Builder, root: Node) -> None:
    vcpu = root.find("vcpu")
    if vcpu is None:
        return
    text = vcpu.value()
    if not text.isdigit():
        b.loss(vcpu, f"{text!r} is not a vCPU count")
        return
    count = int(text)
    current = vcpu.attr("current")
    if current is not None and current.isdigit() and int(current) != count:
        b.loss(vcpu, f"hot-pluggable vCPUs are not supported: the guest gets the {current} "
                     f"it boots with, not up to {count}", "current")
        count = int(current)
    if vcpu.attr("cpuset"):
        b.loss(vcpu, "vCPU pinning (cpuset) is not supported", "cpuset")
    if vcpu.attr("placement") == "auto":
        b.note(vcpu, "placement='auto' (numad) is not used")
    b.set(("smp",), count, vcpu)
    vcpus = root.find("vcpus")
    if vcpus is not None:
        vcpus.use()
        b.loss(vcpus, "per-vCPU hotplug settings are not supported")


def machine_family(machine: str) -> str | None:
    """The unversioned machine type of a versioned one ('pc-q35-10.0' -> 'q35')."""
    for pattern, family in MACHINE_FAMILIES:
        if re.fullmatch(pattern, machine):
            return family or machine.rsplit("-", 1)[0]
    return None


def _os(b: Builder, root: Node) -> None:
    os_ = root.find("os")
    if os_ is None:
        b.refuse(root, "the domain has no <os>")
    os_.use()
    kind = os_.find("type")
    if kind is None or kind.value() != "hvm":
        where = kind or os_
        b.refuse(where, f"os type {kind.text.strip() if kind is not None else 'missing'!r}: "
                        "kvmrun runs full-virtualisation (hvm) guests only")
    arch = kind.attr("arch")
    if arch:
        found = archmod.canonical(arch)
        if found is None:
            b.refuse(kind, f"architecture {arch!r} is not one kvmrun runs",
                     hint="kvmrun runs " + ", ".join(archmod.ARCHES))
        b.arch = found
        b.set(("arch",), found, kind)
    machine = kind.attr("machine")
    if machine:
        family = machine_family(machine)
        if family:
            b.note(kind, f"machine {machine} becomes {family} (the newest {family} of the "
                         "installed QEMU)")
            machine = family
        b.set(("machine",), machine, kind)
    _boot_dev(b, os_)
    _firmware(b, os_)
    _kernel(b, os_)


BOOT_DEVS = {"hd": "c", "cdrom": "d", "network": "n"}


def _boot_dev(b: Builder, os_: Node) -> None:
    order = ""
    for boot in os_.findall("boot"):
        boot.use()
        dev = boot.attr("dev")
        if dev not in BOOT_DEVS:
            b.loss(boot, f"booting from {dev!r} is not supported")
        elif BOOT_DEVS[dev] not in order:
            order += BOOT_DEVS[dev]
    if order:
        b.set(("boot",), order, os_.find("boot"))
    menu = os_.find("bootmenu")
    if menu is not None:
        menu.use()
        menu.attr("timeout")
        if menu.attr("enable") == "yes":
            b.note(menu, "the firmware's boot menu is not enabled")


def _firmware(b: Builder, os_: Node) -> None:
    auto = os_.attr("firmware")
    loader, nvram = os_.find("loader"), os_.find("nvram")
    fw = os_.find("firmware")
    if fw is not None:
        fw.use()
        for feature in fw.findall("feature"):
            feature.use()
            if feature.attr("enabled") == "yes":
                b.loss(feature, f"firmware feature {feature.attr('name')!r} (Secure Boot) is "
                                "not supported: kvmrun's UEFI is the plain OVMF/AAVMF")
            else:
                feature.attr("name")
    if auto == "bios":
        b.set(("firmware",), "bios", os_)
    uefi = auto == "efi"
    if loader is not None:
        path = loader.value()
        kind = loader.attr("type") or ("pflash" if uefi else "rom")
        loader.attr("readonly")
        loader.attr("format")
        if loader.attr("secure") == "yes":
            b.loss(loader, "Secure Boot (secure='yes', SMM-protected variables) is not "
                           "supported", "secure")
        if loader.attr("stateless") == "yes":
            b.note(loader, "stateless firmware: kvmrun keeps a variable store anyway")
        if kind == "pflash":
            uefi = True
            if path:
                b.note(loader, f"loader {path} is replaced by the distribution's UEFI "
                               "firmware (OVMF/AAVMF)")
        elif path:
            b.set(("firmware",), path, loader)
    if uefi:
        b.set(("firmware",), "uefi", loader or os_)
    if nvram is not None:
        path = nvram.value()
        nvram.attr("format")
        if nvram.attr("template"):
            b.note(nvram, "the nvram template is not used: a missing store starts from the "
                          "distribution's")
        if not uefi:
            b.loss(nvram, "an nvram file without UEFI firmware has no use in kvmrun")
        elif path and b.path_exists(path):
            b.nvram = path
            b.note(nvram, f"the UEFI variables are copied from {path} when the VM is defined "
                          "(the file itself is left alone)")
        elif path:
            b.loss(nvram, f"nvram {path!r} not found: the VM would start with fresh UEFI "
                          "variables")


def _kernel(b: Builder, os_: Node) -> None:
    keys = {"kernel": "path", "initrd": "initrd", "cmdline": "append", "dtb": "dtb"}
    found = {key: os_.find(tag) for tag, key in keys.items()}
    if found["path"] is None:
        for key, node in found.items():
            if node is not None:
                node.use()
                b.loss(node, f"<{node.tag}> without a <kernel> has no use")
        return
    for key, node in found.items():
        if node is not None:
            b.set(("kernel", key), node.value(), node)
            if key != "append":
                b.check_path(node, node.value(), f"kernel {key}")


def _features(b: Builder, root: Node) -> None:
    features = root.find("features")
    x86 = (b.arch or archmod.host_arch()) in ("x86_64", "i386")
    if features is None:
        if x86:
            b.note(root, "no <acpi/>: kvmrun guests keep ACPI (kvmrun stop presses its power "
                         "button)")
        return
    features.use()
    for name in ("acpi", "apic", "pae"):
        node = features.find(name)
        if node is not None:
            node.use()
            node.attr("eoi")
    if x86 and features.find("acpi") is None:
        b.note(features, "no <acpi/>: kvmrun guests keep ACPI (kvmrun stop presses its power "
                         "button)")
    smm = features.find("smm")
    if smm is not None:
        smm.use()
        if smm.attr("state", "on") == "on":
            b.note(smm, "SMM is left at QEMU's default")
        else:
            b.loss(smm, "turning SMM off is not supported")
    for node in features.children:
        if not node.used:
            b.drop(node, f"feature <{node.tag}> is not supported (kvmrun uses QEMU's "
                         "defaults)")


CPU_MODES = {"host-passthrough": "host", "maximum": "max", "host-model": "host"}
ON = {"require": "on", "force": "on", "disable": "off", "forbid": "off"}


def _cpu(b: Builder, root: Node) -> None:
    cpu = root.find("cpu")
    if cpu is None:
        return
    cpu.use()
    mode = cpu.attr("mode") or "custom"
    for attr in ("match", "check", "migratable"):
        cpu.attr(attr)
    model = cpu.find("model")
    name = None
    if mode in CPU_MODES:
        name = CPU_MODES[mode]
        if mode == "host-model":
            b.note(cpu, "host-model becomes host (the host's CPU, passed through)")
        if model is not None:
            model.use()
            model.attr("fallback")
    elif mode == "custom" and model is not None:
        name = model.value() or None
        model.attr("fallback")
        model.attr("vendor_id")
    elif mode != "custom":
        b.loss(cpu, f"CPU mode {mode!r} is not supported", "mode")
    flags = []
    for feature in cpu.findall("feature"):
        feature.use()
        policy, fname = feature.attr("policy") or "require", feature.attr("name")
        if policy in ON and fname:
            flags.append(f"{fname}={ON[policy]}")
        else:
            b.note(feature, f"feature {fname!r} with policy {policy!r} is left to QEMU")
    vendor = cpu.find("vendor")
    if vendor is not None:
        vendor.use()
        b.note(vendor, "the CPU vendor follows the model")
    topology = cpu.find("topology")
    if topology is not None:
        topology.use()
        for attr in ("sockets", "dies", "clusters", "cores", "threads"):
            topology.attr(attr)
        b.loss(topology, "CPU topology is not supported: each vCPU is its own socket")
    numa = cpu.find("numa")
    if numa is not None:
        cells = [c for c in numa.findall("cell") if c.attrs.get("memory", "").isdigit()]
        total = sum(int(c.attrs["memory"]) * UNITS.get(c.attrs.get("unit", "KiB").lower(), 1024)
                    for c in cells)
        if total and "memory" in b.data:
            b.set(("memory",), math.ceil(total / MiB), numa)
            b.note(numa, f"memory is the sum of the NUMA cells ({math.ceil(total / MiB)} MiB), "
                         "as libvirt counts it")
        b.drop(numa, "guest NUMA cells are not supported")
    if name:
        b.set(("cpu",), ",".join([name, *flags]), model or cpu)
    elif flags:
        b.note(cpu, "CPU features without a model are left out (kvmrun's default model)")


def _clock_and_events(b: Builder, root: Node) -> None:
    clock = root.find("clock")
    args: list[str] = []
    if clock is not None:
        clock.use()
        offset = clock.attr("offset") or "utc"
        if offset == "localtime":
            args += ["-rtc", "base=localtime"]
        elif offset != "utc":
            b.loss(clock, f"clock offset {offset!r} is not supported", "offset")
        for timer in clock.findall("timer"):
            timer.use()
            for attr in ("name", "tickpolicy", "present", "track", "frequency", "mode"):
                timer.attr(attr)
        if clock.findall("timer"):
            b.note(clock, "timers (" + ", ".join(t.attrs.get("name", "?") for t in
                                                clock.findall("timer"))
                   + ") are left at QEMU's defaults")
    for event, normal in (("on_poweroff", "destroy"), ("on_reboot", "restart"),
                          ("on_crash", "destroy")):
        node = root.find(event)
        if node is None:
            continue
        value = node.value()
        if event == "on_reboot" and value == "destroy":
            args.append("-no-reboot")
        elif event == "on_crash" and value != normal:
            b.note(node, f"on_crash {value}: a panicked guest ends (under systemd, "
                         "Restart=on-failure restarts it)")
        elif value != normal:
            b.loss(node, f"{event} {value!r} is not supported (kvmrun: {normal})")
    pm = root.find("pm")
    if pm is not None:
        pm.use()
        for node in pm.children:
            node.use()
            node.attr("enabled")
        b.note(pm, "suspend settings are left at QEMU's defaults")
    if args:
        b.set(("qemu_args",), b.data.get("qemu_args", []) + args, clock or root)


def _commandline(b: Builder, root: Node) -> None:
    cmd = root.find("qemu:commandline")
    if cmd is None:
        return
    cmd.use()
    for arg in cmd.findall("qemu:arg"):
        arg.use()
        b.set(("qemu_args",), b.data.get("qemu_args", []) + [arg.attr("value") or ""], arg)
    for env in cmd.findall("qemu:env"):
        b.drop(env, "environment variables for QEMU are not supported")


def _metadata(b: Builder, root: Node) -> None:
    meta = root.find("metadata")
    if meta is None:
        return
    meta.use()
    for node in meta.children:
        node.use()
        for sub in _xml.walk(node):
            sub.use()
            sub.read.update(sub.attrs)
        if node.tag == f"{{{KVMRUN_NS}}}profile":
            _kvmrun_keys(b, node)
        else:
            b.note(node, f"metadata <{node.tag.rsplit('}', 1)[-1]}> is not kept")


def _kvmrun_keys(b: Builder, node: Node) -> None:
    """Keys only kvmrun has, written by `kvmrun export --format libvirt` as JSON."""
    try:
        extra = json.loads(node.text)
    except ValueError:
        b.loss(node, "kvmrun metadata that is not JSON")
        return
    if not isinstance(extra, dict):
        b.loss(node, "kvmrun metadata that is not a mapping")
        return
    replace = {k[:-1]: v for k, v in extra.items() if k.endswith("!")}
    b.data.update(merge(b.data, {k: v for k, v in extra.items() if not k.endswith("!")}))
    b.data.update(replace)
    for key in b.data:
        b.lines.setdefault((key,), (b.source, node.line))


def merge(base: Any, extra: Any) -> Any:
    """Mappings merge by key, lists by index (`network[0].forward` onto the first NIC)."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(extra, list):
        out = [merge(x, y) for x, y in zip(base, extra)]
        return out + base[len(extra):] + extra[len(base):]
    return extra
