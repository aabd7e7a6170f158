"""A kvmrun Profile -> libvirt domain XML (`kvmrun export NAME --format libvirt`).

What libvirt has an element for is written as that element, in the form libvirt's RelaxNG
schema accepts (the tests validate with /usr/share/libvirt/schemas/domain.rng). What only
kvmrun has (accel auto, shutdown, ready and ssh settings, port forwards, cloud-init, ephemeral
disks, …), and the defaults libvirt would otherwise fill in differently (kvmrun's default
machine, CPU and MAC addresses are written out for libvirt), go as JSON into
<metadata><kvmrun:profile>, so `kvmrun import` of the result gives the same profile back.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from kvmrun import arch as archmod
from kvmrun.libvirt.domain import KVMRUN_NS
from kvmrun.net.names import stable_mac        # kvmrun's own default, written out
from kvmrun.profile import Profile, to_dict

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBVIRT_ARCH = {"arm": "armv7l", "i386": "i686"}
ACCESS = {"passthrough": "passthrough", "mapped-xattr": "mapped", "none": "squash"}
PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd", "sd": "sd"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: Any) -> ET.Element:
    node = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()
                                       if v is not None})
    if text is not None:
        node.text = text
    return node


def _stable_mac(name: str, index: int) -> str:
    return stable_mac(name, index)


def _pc(p: Profile) -> bool:
    machine = p.machine or archmod.get(p.arch).machine
    return machine in ("pc", "isapc") or machine.startswith("pc-i440fx")


def to_xml(p: Profile) -> str:
    """The domain XML of a profile (a str ending in a newline)."""
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace("kvmrun", KVMRUN_NS)
    extra: dict[str, Any] = {}
    a = archmod.get(p.arch)
    dom = ET.Element("domain", {"type": "qemu" if p.accel == "tcg" else "kvm"})
    if p.accel == "auto":
        extra["accel"] = "auto"
    _sub(dom, "name", p.name)
    _sub(dom, "uuid", p.vm_uuid)
    if p.description:
        _sub(dom, "description", p.description)
    meta = _sub(dom, "metadata")
    _sub(dom, "memory", str(p.memory), unit="MiB")
    if any(share.type == "virtiofs" for share in p.shares):     # virtiofsd maps guest RAM
        backing = _sub(dom, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(dom, "vcpu", str(p.smp), placement="static")
    _os(dom, p, a, extra)
    features = _sub(dom, "features")
    if a.name in ("x86_64", "i386") or p.firmware == "uefi":
        _sub(features, "acpi")
    if a.name in ("x86_64", "i386"):
        _sub(features, "apic")
    if p.secure_boot and a.smm:
        _sub(features, "smm", state="on")
    if not len(features):
        dom.remove(features)
    _cpu(dom, p, extra)
    _sub(dom, "clock", offset="utc")
    devs = _sub(dom, "devices")
    _sub(devs, "emulator", f"/usr/bin/{a.qemu}")
    _disks(devs, p, a, extra)
    _shares(devs, p, extra)
    _nics(devs, p, extra)
    _rest(devs, p, a, extra)
    if p.qemu_args:
        cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in p.qemu_args:
            ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    plain = to_dict(p)
    for key in ("shutdown", "ready", "cloud_init", "ssh", "serial_log_max"):
        if plain.get(key):
            extra[key] = plain[key]
    if "sandbox" in plain:                      # written out only when off
        extra["sandbox"] = plain["sandbox"]
    for key in ("gdb", "halted", "semihosting"):
        if getattr(p, key):
            extra[key] = getattr(p, key)
    if extra:
        node = ET.SubElement(meta, f"{{{KVMRUN_NS}}}profile")
        node.text = json.dumps(extra, sort_keys=True)
    else:
        dom.remove(meta)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _os(dom: ET.Element, p: Profile, a, extra: dict) -> None:
    os_ = _sub(dom, "os")
    if p.firmware == "uefi":
        os_.set("firmware", "efi")
    elif p.firmware == "bios":
        os_.set("firmware", "bios")
    _sub(os_, "type", "hvm", arch=LIBVIRT_ARCH.get(a.name, a.name),
         machine=p.machine or a.machine)
    if p.machine is None:
        extra["machine"] = None
    if p.secure_boot:
        fw = _sub(os_, "firmware")
        _sub(fw, "feature", enabled="yes", name="enrolled-keys")
        _sub(fw, "feature", enabled="yes", name="secure-boot")
        if a.smm:
            _sub(os_, "loader", secure="yes")
    if p.firmware not in (None, "bios", "uefi"):
        _sub(os_, "loader", p.firmware, readonly="yes", type="rom")
    if p.kernel:
        for key, tag in (("path", "kernel"), ("initrd", "initrd"), ("append", "cmdline"),
                         ("dtb", "dtb")):
            if getattr(p.kernel, key):
                _sub(os_, tag, getattr(p.kernel, key))
    for letter in p.boot or "":
        _sub(os_, "boot", dev={"c": "hd", "d": "cdrom", "n": "network"}[letter])
    if not p.boot:
        extra["boot"] = None            # libvirt would boot the first disk (<boot dev='hd'/>)


def _cpu(dom: ET.Element, p: Profile, extra: dict) -> None:
    model, *flags = (p.cpu or "host").split(",")
    if p.cpu is None:
        extra["cpu"] = None             # kvmrun's default: host under KVM (libvirt: qemu64)
    if model == "host":
        cpu = _sub(dom, "cpu", mode="host-passthrough")
    elif model == "max":
        cpu = _sub(dom, "cpu", mode="maximum")
    else:
        cpu = _sub(dom, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", model, fallback="forbid")
    written = [model]
    for flag in flags:
        name, _, value = flag.partition("=")
        policy = "disable" if value in ("off", "false") or name.startswith("-") else "require"
        _sub(cpu, "feature", policy=policy, name=name.lstrip("+-"))
        written.append(f"{name.lstrip('+-')}={'off' if policy == 'disable' else 'on'}")
    if p.cpu is not None and ",".join(written) != p.cpu:
        extra["cpu"] = p.cpu                # as written (-hle, not hle=off)


def _disk_bus(interface: str, p: Profile) -> str:
    return "sata" if interface == "ide" and not _pc(p) else interface


def _target(counts: dict, bus: str) -> str:
    index = counts.get(PREFIX[bus], 0)
    counts[PREFIX[bus]] = index + 1
    return PREFIX[bus] + "abcdefghijklmnopqrstuvwxyz"[index % 26] + (str(index // 26) if
                                                                   index >= 26 else "")


def _disks(devs: ET.Element, p: Profile, a, extra: dict) -> None:
    counts: dict[str, int] = {}
    disks_extra = []
    for i, d in enumerate(p.disks):
        more: dict[str, Any] = {}
        if d.pool:
            disk = _sub(devs, "disk", type="volume", device="disk")
        else:
            disk = _sub(devs, "disk", type="block" if d.path.startswith("/dev/") else "file",
                        device="disk")
        _sub(disk, "driver", name="qemu", type=d.format or ("qcow2" if d.backing else None),
             cache=d.cache)
        if d.format is None and not d.pool:
            more["format"] = None       # kvmrun detects it; libvirt would say raw
        elif d.pool and d.format:
            more["format"] = d.format
        if d.pool:
            _sub(disk, "source", pool=d.pool, volume=d.volume)
        elif disk.get("type") == "block":
            _sub(disk, "source", dev=d.path)
        else:
            _sub(disk, "source", file=d.path)
        if d.backing:
            store = _sub(disk, "backingStore", type="file")
            _sub(store, "format", type="raw" if d.backing.endswith(".img") else "qcow2")
            _sub(store, "source", file=d.backing)
        bus = _disk_bus(d.interface, p)
        if bus == "nvme":               # libvirt 9's schema has no NVMe bus
            bus, more["interface"] = "scsi", "nvme"
        _sub(disk, "target", dev=_target(counts, bus), bus=bus)
        if d.readonly:
            _sub(disk, "readonly")
        for key in ("size", "ephemeral"):
            if getattr(d, key):
                more[key] = getattr(d, key)
        disks_extra.append(more)
    if any(disks_extra):
        extra["disks"] = disks_extra
    if p.cdrom:
        bus = _disk_bus("ide", p) if a.cdrom_bus == "ide" else "scsi"
        disk = _sub(devs, "disk", type="file", device="cdrom")
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=p.cdrom)
        _sub(disk, "target", dev=_target(counts, bus), bus=bus)
        _sub(disk, "readonly")


def _shares(devs: ET.Element, p: Profile, extra: dict) -> None:
    more = []
    for s in p.shares:
        if s.type == "virtiofs":           # libvirt: passthrough access, shared memory
            fs = _sub(devs, "filesystem", type="mount", accessmode="passthrough")
            _sub(fs, "driver", type="virtiofs")
            _sub(fs, "source", dir=s.path)
            _sub(fs, "target", dir=s.tag)
            more.append({})
            continue
        fs = _sub(devs, "filesystem", type="mount",
                  accessmode=ACCESS.get(s.security_model, "mapped"))
        _sub(fs, "driver", type="path")
        _sub(fs, "source", dir=s.path)
        _sub(fs, "target", dir=s.tag)
        if s.readonly:
            _sub(fs, "readonly")
        more.append({"security_model": s.security_model}
                    if s.security_model not in ACCESS else {})
    if any(more):
        extra["shares"] = more


USER_KEYS = ("forward", "restrict", "net", "dhcpstart", "tftp", "bootfile")


def _nics(devs: ET.Element, p: Profile, extra: dict) -> None:
    more = []
    for i, n in enumerate(p.network):
        if n.type == "none":
            continue
        keys: dict[str, Any] = {}
        if n.type == "user":
            iface = _sub(devs, "interface", type="user")
        elif n.type == "bridge":
            iface = _sub(devs, "interface", type="bridge")
            _sub(iface, "source", bridge=n.bridge)
        else:                             # nat and isolated: a named network
            iface = _sub(devs, "interface", type="network")
            _sub(iface, "source", network=n.name or "default")
            if n.type == "isolated":
                keys["type"] = "isolated"
            if n.type == "nat" and n.name == "default":
                keys["name"] = "default"
        _sub(iface, "mac", address=n.mac or _stable_mac(p.name, i))
        if n.mac is None:
            keys["mac"] = None
        _sub(iface, "model", type=n.model or "virtio")
        for key in USER_KEYS:
            value = getattr(n, key)
            if value not in (None, (), False):
                keys[key] = list(value) if isinstance(value, tuple) else value
        more.append(keys)
    if any(n.type == "none" for n in p.network):    # not in the XML: replace the whole list
        extra["network!"] = to_dict(p)["network"]
    elif any(more):
        extra["network"] = more



def _rest(devs: ET.Element, p: Profile, a, extra: dict) -> None:
    if p.serial in ("log", "socket", "stdio"):
        serial = _sub(devs, "serial", type="pty")
        if a.name in ("x86_64", "i386"):
            _sub(serial, "target", port="0")
        _sub(_sub(devs, "console", type="pty"), "target", type="serial", port="0")
        if p.serial != "log":
            extra["serial"] = p.serial
    canonical = [d for d in ("agent", "tablet", "balloon", "rng") if d in p.devices]
    if list(p.devices) != canonical:
        extra["devices"] = list(p.devices)      # the order an import would read them in
    for device in p.devices:
        if device == "agent":
            ch = _sub(devs, "channel", type="unix")
            _sub(ch, "target", type="virtio", name="org.qemu.guest_agent.0")
        elif device == "tablet":
            _sub(devs, "input", type="tablet", bus="usb")
    if p.display in ("vnc", "spice", "sdl"):
        _sub(devs, "graphics", type=p.display, **({"autoport": "yes"} if p.display != "sdl"
                                                  else {}))
        model = ("qxl" if p.display == "spice" else "vga") if a.name in (
            "x86_64", "i386") else "virtio"
        _sub(_sub(devs, "video"), "model", type=model)
    elif p.display == "gtk":
        extra["display"] = "gtk"
    if p.tpm:
        tpm = _sub(devs, "tpm", model="tpm-crb" if a.tpm == "tpm-crb" else "tpm-tis")
        _sub(tpm, "backend", type="emulator", version="2.0")
    _sub(devs, "memballoon", model="virtio" if "balloon" in p.devices else "none")
    if "rng" in p.devices:
        rng = _sub(devs, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
