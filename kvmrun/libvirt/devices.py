"""The <devices> of a libvirt domain -> kvmrun's disks, cdrom, shares, network, serial,
display and devices (see kvmrun.libvirt.domain for the whole picture)."""

from __future__ import annotations

import re

from kvmrun.libvirt._xml import Node, consume
from kvmrun.libvirt.disks import Devices, _disk
from kvmrun.paths import NAME_RE

ACCESS = {"passthrough": "passthrough", "mapped": "mapped-xattr", "squash": "none"}
TAG_RE = r"[A-Za-z0-9_.-]{1,31}"
UNSUPPORTED = {
    "hostdev": "PCI/USB passthrough is not supported",
    "redirdev": "USB redirection is not supported",
    "smartcard": "smartcards are not supported",
    "watchdog": "watchdog devices are not supported",
    "sound": "sound devices are not supported",
    "panic": "panic notifier devices are not supported",
    "shmem": "shared-memory devices are not supported",
    "memory": "memory modules (DIMM hotplug) are not supported",
    "iommu": "a virtual IOMMU is not supported",
    "vsock": "vsock is not supported",
    "parallel": "parallel ports are not supported",
    "hub": "USB hubs are not supported",
    "lease": "lock leases are not supported",
    "crypto": "virtio-crypto is not supported",
}


def convert(b, root: Node) -> None:
    devs = root.find("devices")
    d = Devices(b)
    if devs is not None:
        devs.use()
        for node in devs.children:
            handler = HANDLERS.get(node.tag)
            if handler:
                node.use()
                handler(d, node)
            elif node.tag in UNSUPPORTED:
                b.drop(node, UNSUPPORTED[node.tag])
    _slots(d, devs)
    if d.disks:
        b.set(("disks",), d.disks, None)
    b.set(("network",), d.nets, None)
    b.set(("devices",), list(dict.fromkeys(d.wanted)), None)
    _serial(d, devs)
    _display(d, devs)
    _boot(d, root)


# ---------------------------------------------------------------- storage


# ---------------------------------------------------------------- network and shares

def _interface(d: Devices, iface: Node) -> None:
    b = d.b
    kind = iface.attr("type")
    source = iface.find("source")
    src = source.use().attrs if source is not None else {}
    if source is not None:
        source.read.update(("network", "bridge"))
    net: dict = {"type": "user"}
    if kind == "network":
        name = src.get("network", "default")
        if name == "default":
            net = {"type": "nat"}
        elif re.fullmatch(NAME_RE, name) and len(name) <= 32:
            net = {"type": "nat", "name": name}
            b.note(iface, f"libvirt network {name!r} becomes the kvmrun NAT network {name!r} "
                          "(defined with defaults on first start: check its subnet)")
        else:
            b.loss(iface, f"libvirt network {name!r} has no kvmrun counterpart: a user-mode "
                          "NIC with the same MAC stands in")
    elif kind == "bridge":
        bridge = src.get("bridge", "")
        if re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
            net = {"type": "bridge", "bridge": bridge}
        else:
            b.loss(iface, f"bridge {bridge!r} is not a host bridge name")
    elif kind != "user":
        b.loss(iface, f"interface type {kind!r} is not supported: a user-mode NIC with the "
                      "same MAC stands in")
    tap = iface.find("target")
    if tap is not None:
        tap.use().read.update(("dev", "managed"))
        b.note(tap, f"the host interface name {tap.attrs.get('dev')!r} is not kept: kvmrun "
                    "names its taps itself")
    mac = iface.find("mac")
    if mac is not None:
        mac.use()
        net["mac"] = (mac.attr("address") or "").lower()
    model = iface.find("model")
    machine = b.data.get("machine", "")
    if model is not None:
        model.use()
        name = model.attr("type") or ""
        if not name.startswith("virtio"):
            net["model"] = name
    elif (b.arch or "x86_64") in ("x86_64", "i386"):
        net["model"] = "rtl8139"              # libvirt's default NIC on PCs
    elif not machine.startswith("vexpress"):
        b.note(iface, "a NIC without a model gets kvmrun's (virtio-net)")
    index = len(d.nets)
    d.boot_order(iface, "n" if index == 0 else None)
    d.nets.append(net)
    b.lines[("network", index)] = (b.source, iface.line)


def _filesystem(d: Devices, fs: Node) -> None:
    b = d.b
    kind = fs.attr("type") or "mount"
    if kind != "mount":
        return b.drop(fs, f"filesystem type {kind!r} is not supported (a host directory)")
    driver = fs.find("driver")
    virtiofs = False
    if driver is not None:
        driver.use()
        if driver.attr("type") == "virtiofs":
            virtiofs = True
            binary = fs.find("binary")
            if binary is not None:
                binary.use()
                binary.read.update(binary.attrs)
                for sub in binary.children:
                    sub.use()
                    sub.read.update(sub.attrs)
            driver.read.add("queue")
    access = fs.attr("accessmode") or "passthrough"
    source, target = fs.find("source"), fs.find("target")
    if source is None or target is None:
        return b.drop(fs, "a filesystem needs a <source dir> and a <target dir>")
    path, tag = source.use().attr("dir"), target.use().attr("dir") or ""
    if not path:
        return b.drop(fs, "a filesystem needs a <source dir>")
    share = {"path": path, "tag": tag, "security_model": ACCESS.get(access, "none")}
    if virtiofs and fs.find("readonly") is not None:
        b.loss(fs, "a read-only virtiofs share is shared over virtio-9p instead (QEMU 7.2's "
                   "virtiofsd has no read-only mode; mount -t 9p in the guest)")
    elif virtiofs:                     # virtiofsd runs as this user: no ownership mapping
        share = {"path": path, "tag": tag, "type": "virtiofs"}
    elif access not in ACCESS:
        b.loss(fs, f"access mode {access!r} is not supported", "accessmode")
    if not re.fullmatch(TAG_RE, tag):
        share["tag"] = (re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip("_")[:31]
                        or f"share{len(b.data.get('shares', []))}")
        b.loss(target, f"mount tag {tag!r} is not a kvmrun tag (letters, digits, . _ -, at "
                       f"most 31): it becomes {share['tag']!r}")
    if fs.find("readonly") is not None:
        fs.find("readonly").use()
        share["readonly"] = True
    b.check_path(source, path, "shared directory")
    d.boot_order(fs, None)
    b.set(("shares",), b.data.get("shares", []) + [share], fs)


# ---------------------------------------------------------------- the rest

def _tpm(d: Devices, node: Node) -> None:
    """An emulated TPM 2.0 (swtpm) is `tpm: true`; kvmrun picks the model per architecture."""
    b = d.b
    node.attr("model")
    backend = node.find("backend")
    if backend is None or backend.use().attr("type") != "emulator":
        return b.drop(node, "only an emulated TPM (backend type emulator: swtpm) is supported")
    if backend.attr("version", "2.0") != "2.0":
        return b.drop(node, "TPM 1.2 is not supported: kvmrun's TPM is 2.0")
    b.set(("tpm",), True, node)


def _channel(d: Devices, ch: Node) -> None:
    target = ch.find("target")
    name = target.attrs.get("name") if target is not None else None
    if ch.attr("type") == "unix" and name == "org.qemu.guest_agent.0":
        target.use().read.update(("type", "name"))
        source = ch.find("source")
        if source is not None:
            source.use().read.update(("mode", "path"))
        d.wanted.append("agent")
        return
    what = f"channel {name!r}" if name else f"an unnamed {ch.attrs.get('type')} channel"
    d.b.drop(ch, f"{what} is not supported (only the QEMU guest agent's)")


def _input(d: Devices, node: Node) -> None:
    kind, bus = node.attr("type"), node.attr("bus")
    x86 = (d.b.arch or "x86_64") in ("x86_64", "i386")
    if kind == "tablet" and bus == "usb":
        d.wanted.append("tablet")
    elif kind in ("mouse", "keyboard") and bus == "ps2" and x86:
        pass                                     # built into the PC
    elif kind == "keyboard" and bus == "usb" and x86:
        d.b.note(node, "the USB keyboard is the PC's PS/2 keyboard")
    else:
        d.b.drop(node, f"input {kind} on {bus} is not supported (kvmrun: a USB tablet)")


def _memballoon(d: Devices, node: Node) -> None:
    model = node.attr("model")
    if model and model.startswith("virtio"):
        d.wanted.append("balloon")
    elif model != "none":
        d.b.loss(node, f"memory balloon {model!r} is not supported")


def _rng(d: Devices, node: Node) -> None:
    backend = node.find("backend")
    if backend is not None:
        backend.use()
        source = backend.value()
        if backend.attr("model") != "random" or source not in ("", "/dev/urandom",
                                                               "/dev/random"):
            d.b.note(backend, "the RNG's entropy comes from QEMU's default source")
    if (node.attr("model") or "").startswith("virtio"):
        d.wanted.append("rng")
    else:
        d.b.loss(node, f"RNG model {node.attrs.get('model')!r} is not supported")


def _controller(d: Devices, node: Node) -> None:
    kind, model = node.attr("type"), node.attr("model")
    node.read.update(node.attrs)
    for sub in node.children:
        sub.use().read.update(sub.attrs)
    if kind == "scsi" and model not in (None, "virtio-scsi"):
        d.b.loss(node, f"SCSI controller model {model!r}: kvmrun's SCSI disks sit on "
                       "virtio-scsi")
    elif not any(f.message.startswith("controllers") for f in d.b.notes):
        d.b.note(node, "controllers are not kept: kvmrun adds those its devices need")


def _audio(d: Devices, node: Node) -> None:
    node.attr("id")
    if node.attr("type") != "none":
        d.b.loss(node, "audio back ends are not supported")


def _emulator(d: Devices, node: Node) -> None:
    d.b.note(node, f"the emulator {node.value()} is not kept: kvmrun runs qemu-system-ARCH "
                   "from PATH")


HANDLERS = {"disk": _disk, "interface": _interface, "filesystem": _filesystem, "tpm": _tpm,
            "channel": _channel, "input": _input, "memballoon": _memballoon, "rng": _rng,
            "controller": _controller, "audio": _audio, "emulator": _emulator,
            "serial": lambda d, n: None, "console": lambda d, n: None,
            "graphics": lambda d, n: None, "video": lambda d, n: None}


PCI_SLOTS = 28          # of the root bus's 32: host bridge, ISA/LPC, VGA and one spare


def _slots(d: Devices, devs: Node | None) -> None:
    """kvmrun puts every device on the root PCI bus (no bridges): NICs beyond its slots are
    dropped, each with a loss (libvirt would have added pci-bridge controllers)."""
    if (d.b.arch or "x86_64") not in ("x86_64", "i386") or devs is None:
        return
    used = (sum(1 for x in d.disks if x["interface"] in ("virtio", "nvme"))
            + any(x["interface"] == "scsi" for x in d.disks) + len(set(d.wanted))
            + len(d.b.data.get("shares", [])))
    free = max(PCI_SLOTS - used, 0)
    ifaces = devs.findall("interface")
    for node in ifaces[free:len(d.nets)]:
        d.b.loss(node, f"no PCI slot left for this NIC: kvmrun puts devices on the root bus "
                       f"({PCI_SLOTS} slots), without pci-bridge controllers")
    d.nets = d.nets[:free]


def _serial(d: Devices, devs: Node | None) -> None:
    b = d.b
    ports = (devs.findall("serial") + devs.findall("console")) if devs is not None else []
    if not ports:
        b.set(("serial",), "none", None)
        return
    seen_serial = False
    for port in ports:
        target = port.find("target")
        ttype = target.attrs.get("type") if target is not None else None
        consume(port)
        if ttype == "virtio":
            b.loss(port, "a virtio console is not supported (kvmrun's console is the "
                         "serial port)")
        elif port.tag == "serial" or not seen_serial:
            if seen_serial and port.tag == "serial":
                b.loss(port, "a second serial port is not supported")
            seen_serial = True
    if seen_serial:
        b.set(("serial",), "log", ports[0])
        b.note(ports[0], f"the {ports[0].attrs.get('type', 'pty')} console becomes kvmrun's "
                         "console socket and serial.log (kvmrun console NAME)")
    else:
        b.set(("serial",), "none", None)


DISPLAYS = {"vnc": "vnc", "spice": "spice", "sdl": "sdl"}


def _display(d: Devices, devs: Node | None) -> None:
    b = d.b
    graphics = devs.findall("graphics") if devs is not None else []
    videos = devs.findall("video") if devs is not None else []
    for extra in graphics[1:]:
        b.drop(extra, "a second graphical console is not supported")
    for extra in videos[1:]:
        b.drop(extra, "a second video adapter is not supported")
    if graphics:
        g = graphics[0]
        kind = g.attr("type")
        if kind not in DISPLAYS:
            b.loss(g, f"graphics type {kind!r} is not supported")
        else:
            b.set(("display",), DISPLAYS[kind], g)
            g.read.update(("port", "autoport", "listen", "keymap", "tlsPort", "defaultMode",
                           "websocket", "sharePolicy"))
            for listen in g.findall("listen"):
                listen.use().read.update(listen.attrs)
            if kind != "sdl":
                b.note(g, f"{kind.upper()} listens on a unix socket in the run directory "
                          "(kvmrun status shows it), not on a TCP port")
    if videos:
        v = videos[0]
        model = v.find("model")
        if model is not None:
            model.use().read.update(model.attrs)
            for sub in model.children:
                sub.use().read.update(sub.attrs)
        name = model.attrs.get("type") if model is not None else "default"
        if not graphics:
            b.note(v, f"the {name} video adapter has no display to show: kvmrun adds none")
        else:
            b.note(v, f"the {name} video adapter becomes kvmrun's for this display")


def _boot(d: Devices, root: Node) -> None:
    b = d.b
    if d.boot:
        order = ""
        for _, letter, node in sorted(d.boot, key=lambda x: x[0]):
            if letter is None:
                b.loss(_parent(root, node), "only the first disk, the CD-ROM and the first "
                                            "NIC can be in kvmrun's boot order")
            elif letter not in order:
                order += letter
        if order:
            b.set(("boot",), order, d.boot[0][2])
    elif "boot" not in b.data and d.disks:
        b.data["boot"] = "c"             # libvirt's default: <boot dev='hd'/>


def _parent(root: Node, child: Node) -> Node:
    from kvmrun.libvirt._xml import walk
    return next((n for n in walk(root) if child in n.children), child)
