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
from typing import Any, Callable

from kvmrun.errors import PoolError
from kvmrun.libvirt import _xml
from kvmrun.libvirt._xml import Finding, Node
from kvmrun.libvirt.builder import Builder
from kvmrun.libvirt.machine import (UNITS, MiB, _clock_and_events, _cpu, _features, _os,
                                    machine_family)
from kvmrun.records import field, record
from kvmrun.storage import pools

__all__ = ["Conversion", "Finding", "convert", "machine_family", "merge"]

KVMRUN_NS = "https://kvmrun.dev/libvirt/profile/1"     # exported kvmrun-only keys
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


@record
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


def convert(raw: bytes, source: str, *, path_exists: Callable[[str], bool] = os.path.exists,
            pool_exists: Callable[[str], bool] | None = None) -> Conversion:
    """Map a libvirt domain definition (bytes of XML) onto a kvmrun profile mapping."""
    if pool_exists is None:
        pool_exists = _pool_exists
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
    _memory_backing(b, root)
    _commandline(b, root)
    _metadata(b, root)
    for node in root.children:
        if not node.used and node.tag in UNSUPPORTED:
            b.drop(node, UNSUPPORTED[node.tag])
    losses, notes = _xml.leftovers(root)
    return Conversion(b.data, b.lines, source, b.losses + losses, b.notes + notes, b.nvram,
                      b.missing)


# ---------------------------------------------------------------- the domain itself

def _memory_backing(b: Builder, root: Node) -> None:
    """A memfd source with shared access is what virtiofs shares need, and kvmrun gives
    guest RAM that itself when a profile has one; anything else stays unsupported."""
    backing = root.find("memoryBacking")
    if backing is None or not any(s.get("type") == "virtiofs"
                                  for s in b.data.get("shares", [])):
        return
    wanted = {"source": ("type", "memfd"), "access": ("mode", "shared")}
    if all(wanted.get(c.tag) and c.attrs.get(wanted[c.tag][0]) == wanted[c.tag][1]
           and set(c.attrs) == {wanted[c.tag][0]} and not c.children
           for c in backing.children):
        backing.use()
        for child in backing.children:
            child.use().attr(wanted[child.tag][0])


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


def _pool_exists(name: str) -> bool:
    try:
        pools.get(name)
    except PoolError:
        return False
    return True
