"""The machine half of a libvirt domain: <os> (type, machine, boot, firmware, direct kernel
boot), <features>, <cpu>, <clock> and the on_* events (see kvmrun.libvirt.domain)."""

from __future__ import annotations

import math
import re
from kvmrun import arch as archmod
from kvmrun.libvirt._xml import Node
from kvmrun.libvirt.builder import Builder

MiB = 1024 * 1024


UNITS = {"b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000 ** 2,
         "m": MiB, "mib": MiB, "gb": 1000 ** 3, "g": 1024 ** 3, "gib": 1024 ** 3,
         "tb": 1000 ** 4, "t": 1024 ** 4, "tib": 1024 ** 4}


MACHINE_FAMILIES = ((r"pc-q35-.*", "q35"), (r"pc-i440fx-.*|pc-\d.*", "pc"),
                    (r"(virt|pseries|s390-ccw-virtio)-\d.*", None))


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
    secure = None                       # the node that asks for Secure Boot
    if fw is not None:
        fw.use()
        wanted = {}
        for feature in fw.findall("feature"):
            feature.use()
            wanted[feature.attr("name")] = feature
        boot, keys = wanted.pop("secure-boot", None), wanted.pop("enrolled-keys", None)
        state = {name: None if f is None else f.attr("enabled") == "yes"
                 for name, f in (("boot", boot), ("keys", keys))}
        # libvirt picks firmware that verifies for either; kvmrun's Secure Boot store has
        # Microsoft's keys enrolled and its plain store none, so the two go together
        if state["boot"] or (state["keys"] and state["boot"] is None):
            secure = boot if state["boot"] else keys
            if state["keys"] is False:
                b.loss(keys, "Secure Boot without enrolled keys is not supported: a new "
                             "variable store has Microsoft's keys enrolled")
        elif state["keys"]:
            b.loss(keys, "enrolled keys without Secure Boot are not supported: the plain "
                         "UEFI variable store has none")
        for name, feature in wanted.items():
            if feature.attr("enabled") == "yes":
                b.loss(feature, f"firmware feature {name!r} is not supported")
    if auto == "bios":
        b.set(("firmware",), "bios", os_)
    uefi = auto == "efi"
    if loader is not None:
        path = loader.value()
        kind = loader.attr("type") or ("pflash" if uefi else "rom")
        loader.attr("readonly")
        loader.attr("format")
        if loader.attr("secure") == "yes":
            secure = secure or loader
        if loader.attr("stateless") == "yes":
            b.note(loader, "stateless firmware: kvmrun keeps a variable store anyway")
        if kind == "pflash":
            uefi = True
            if path:
                b.note(loader, f"loader {path} is replaced by the distribution's UEFI "
                               "firmware (OVMF/AAVMF)")
        elif path:
            b.set(("firmware",), path, loader)
    if secure is not None and uefi:
        b.set(("firmware",), "uefi-secure", secure)
        b.note(secure, "Secure Boot: the distribution's Secure Boot firmware (SMM on for x86); "
                       "a new variable store has Microsoft's keys enrolled")
    elif uefi:
        b.set(("firmware",), "uefi", loader or os_)
    elif secure is not None:
        b.loss(secure, "Secure Boot without UEFI firmware has no use in kvmrun")
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
            if b.data.get("firmware") != "uefi-secure":     # Secure Boot turns it on
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
