"""Cross-field rules: values that are each valid but that QEMU refuses together, and
warnings for things that work but probably not as meant. Pure: the profile and the
architecture table only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

from kvmrun import arch as archmod
from kvmrun.errors import Location, ProfileError
from kvmrun.profile.keys import USER_ONLY
from kvmrun.profile.model import Profile, is_key_file
from kvmrun.profile.spec import Ctx

ALWAYS_WRITABLE = {"ide": "an IDE disk", "sd": "an SD card"}   # QEMU refuses read-only ones
PCI_ONLY_DISKS = ("ide", "nvme", "sd")       # need an AHCI, NVMe or SDHCI controller on PCI


def _check_board(p: Profile, ctx: Ctx) -> None:
    """A board without PCI (e.g. vexpress-a9) takes virtio-mmio devices and its on-board NIC."""
    board = archmod.get(p.arch).board(p.machine)
    if board is None or board.virtio == "pci":
        return
    why = board.note or f"{board.name} has no PCI bus"
    for i, disk in enumerate(p.disks):
        if disk.interface in PCI_ONLY_DISKS:
            ctx.error(("disks", i, "interface"), f"{why}: no place for {disk.interface} disks",
                      hint="use interface: virtio (virtio-mmio)" if board.virtio else None)
    if p.cloud_init and p.cloud_init.interface == "ide":
        ctx.error(("cloud_init", "interface"), f"{why}: no place for an IDE CD-ROM",
                  hint="leave interface at virtio (virtio-mmio)" if board.virtio else None)
    if "tablet" in p.devices:
        ctx.error(("devices",), f"{why}: no USB controller for the tablet")
    if board.virtio is None:
        for i, _ in enumerate(p.shares):
            ctx.error(("shares", i), f"{why} and no virtio: no place for a shared directory")
        for i, net in enumerate(p.network):
            if net.type == "user" and (net.model or board.nic) != board.nic:
                ctx.error(("network", i), f"{why} and no virtio: only its on-board NIC "
                                          f"({board.nic or 'none'}) fits",
                          hint="network: []" if not board.nic else f"model: {board.nic}")
        if p.devices:
            ctx.error(("devices",), f"{why} and no virtio: virtio devices do not fit",
                      hint="devices: []")


def power_button_problem(p: Profile) -> str | None:
    """What is wrong with shutdown.method acpi on a machine without a power button."""
    a = archmod.get(p.arch)
    machine = p.machine or a.machine
    if p.shutdown.method != "acpi" or a.has_power_button(machine):
        return None
    return (f"the {machine} machine has no power button, so shutdown.method acpi "
            f"(QEMU's system_powerdown) never reaches the guest")


POWER_BUTTON_HINT = ("set shutdown.method: console (with shutdown.command, e.g. 'poweroff -f'), "
                     "agent (QEMU guest agent) or none (kvmrun stop --force ends it)")


def warnings(p: Profile) -> list[ProfileError]:
    """Things that work but probably not as meant (printed by validate, cmdline, start)."""
    problem = power_button_problem(p)
    found = [ProfileError(p.location("shutdown", "method"), problem, POWER_BUTTON_HINT)
             ] if problem else []
    if not p.sandbox:
        found.append(ProfileError(p.location("sandbox"), "QEMU runs without its seccomp "
                                  "sandbox: a guest that breaks out of QEMU has all of "
                                  "this user's system calls"))
    return found + list(_bus_driver_warnings(p))


def _bus_driver_warnings(p: Profile) -> Iterable[ProfileError]:
    """A CD-ROM on q35 sits on its AHCI controller, whose driver some kernels lack."""
    a = archmod.for_machine(p.arch, p.machine)
    machine = p.machine or a.machine
    if a.cdrom_bus != "ide" or machine in ("pc", "isapc") or machine.startswith("pc-i440fx"):
        return
    why = (f"on the {machine} machine a CD-ROM is an ide-cd on its SATA AHCI controller; "
           "kernels without AHCI (CONFIG_SATA_AHCI, e.g. Debian's cloud kernel "
           "linux-image-cloud-amd64) do not see it")
    if p.cdrom:
        yield ProfileError(p.location("cdrom"), why,
                           "for such a kernel attach the image as a disk (disks: [{path: ISO, "
                           "format: raw, readonly: true}]) or use machine: pc")
    if p.cloud_init and p.cloud_init.interface == "ide":
        yield ProfileError(p.location("cloud_init", "interface"), why,
                           "leave interface at virtio (a read-only virtio disk: every cloud "
                           "kernel finds it)")


def check_combinations(p: Profile, ctx: Ctx) -> None:
    """Values that are each valid but that QEMU refuses together."""
    a = archmod.ARCHES.get(p.arch)
    _check_board(p, ctx)
    if p.limits.memory_max is not None and p.limits.memory_max <= p.memory:
        ctx.error(("limits", "memory_max"), f"{p.limits.memory_max} MiB is not above the guest's "
                  f"memory ({p.memory} MiB): QEMU needs its own memory on top and would be "
                  f"killed by the OOM killer", hint=f"give at least {p.memory + 256}M")
    if ("shutdown", "method") in ctx.lines and power_button_problem(p):
        # written out: an error; left at the default: a warning (see warnings())
        ctx.error(("shutdown", "method"), power_button_problem(p), hint=POWER_BUTTON_HINT)
    if p.semihosting and a and not a.semihosting:
        ctx.error(("semihosting",), f"semihosting is not available for {a.name} guests",
                  hint="QEMU offers it for " + ", ".join(
                      n for n, x in archmod.ARCHES.items() if x.semihosting))
    for i, disk in enumerate(p.disks):
        if disk.readonly and disk.interface in ALWAYS_WRITABLE:
            ctx.error(("disks", i, "readonly"),
                      f"{ALWAYS_WRITABLE[disk.interface]} cannot be read-only",
                      hint="use interface virtio, scsi or nvme for a read-only disk")
        if disk.backing and disk.format == "raw":
            ctx.error(("disks", i, "format"), "a disk with a backing image is a qcow2 overlay",
                      hint="leave format out, or write format: qcow2")
        if disk.ephemeral and disk.readonly:
            ctx.error(("disks", i, "ephemeral"), "a read-only disk is never written, so it "
                                                 "cannot be ephemeral")
        if disk.backing and os.path.realpath(disk.backing) == os.path.realpath(disk.path):
            ctx.error(("disks", i, "backing"), "a disk cannot be its own backing image")
    if p.ready.console and p.ready.cloud_init:
        ctx.error(("ready", "cloud_init"), "give ready.console or ready.cloud_init, not both",
                  hint="ready.cloud_init waits for the console line "
                       "'Cloud-init v. … finished'")
    _check_secure_boot(p, ctx)
    _check_disk_sources(p, ctx)
    _check_ide_slots(p, ctx)
    _check_networks(p, ctx)
    _check_shares(p, ctx)
    _check_tpm(p, ctx)


def _check_shares(p: Profile, ctx: Ctx) -> None:
    tags = [s.tag for s in p.shares]
    for i, share in enumerate(p.shares):
        if tags.index(share.tag) != i:
            ctx.error(("shares", i, "tag"), f"tag {share.tag!r} is used twice")
        if share.type != "virtiofs":
            continue
        if share.readonly:
            ctx.error(("shares", i, "readonly"), "a virtiofs share cannot be read-only here "
                      "(QEMU 7.2's virtiofsd has no read-only mode)",
                      hint="use type: 9p for a read-only share, or mount it read-only in the "
                           "guest (mount -t virtiofs -o ro TAG /mnt)")
        if ("shares", i, "security_model") in ctx.lines:
            ctx.error(("shares", i, "security_model"), "security_model is for type: 9p, not "
                                                       "type: virtiofs")


def _check_tpm(p: Profile, ctx: Ctx) -> None:
    if not p.tpm:
        return
    a = archmod.get(p.arch)
    board = a.board(p.machine)
    if a.tpm is None:
        ctx.error(("tpm",), f"kvmrun offers no TPM for {a.name} guests",
                  hint="TPM 2.0 is there for " + ", ".join(
                      n for n, x in archmod.ARCHES.items() if x.tpm))
    elif board is not None:
        ctx.error(("tpm",), f"the {board.name} machine has no place for a TPM ({a.tpm})",
                  hint=f"use the {a.machine} machine")


def _check_secure_boot(p: Profile, ctx: Ctx) -> None:
    """Secure Boot is UEFI's, on an architecture with Secure Boot firmware; on x86 the code
    keeps its variables safe in SMM, which OVMF supports on q35 only."""
    spelled = p.firmware == "uefi-secure"
    if not (p.secure_boot or spelled):
        return
    key = ("firmware",) if spelled or ("secure_boot",) not in ctx.lines else ("secure_boot",)
    if spelled and ("secure_boot",) in ctx.lines and not p.secure_boot:
        ctx.error(("secure_boot",), "firmware: uefi-secure is UEFI with Secure Boot: "
                                    "secure_boot: false contradicts it",
                  hint="firmware: uefi for UEFI without Secure Boot")
        return
    if p.firmware != "uefi" and not spelled:
        ctx.error(key, "Secure Boot needs UEFI firmware"
                       + (f", not {p.firmware}" if p.firmware else ""),
                  hint="firmware: uefi-secure (or firmware: uefi with secure_boot: true)")
        return
    a = archmod.ARCHES.get(p.arch)
    if a is None:
        return
    if not a.uefi_secure:
        ctx.error(key, f"Secure Boot is not available for {a.name} guests",
                  hint="kvmrun offers it for " + ", ".join(
                      n for n, x in archmod.ARCHES.items() if x.uefi_secure))
        return
    machine = p.machine or a.machine
    if a.smm and not (machine == "q35" or machine.startswith("pc-q35-")):
        ctx.error(("machine",) if p.machine else key,
                  f"Secure Boot needs the q35 machine, not {machine}: OVMF's Secure Boot "
                  f"build keeps the UEFI variables in SMM, which it supports on q35 only",
                  hint="machine: q35 (or leave machine out)")


def _check_disk_sources(p: Profile, ctx: Ctx) -> None:
    """A disk is a path, or a pool + volume (resolved against the host by kvmrun.storage)."""
    for i, disk in enumerate(p.disks):
        if bool(disk.pool) != bool(disk.volume):
            ctx.error(("disks", i), "pool and volume go together",
                      hint="write both (pool: NAME, volume: FILE), or a path")
        elif not disk.pool and not disk.path:
            ctx.error(("disks", i), "missing required key 'path'")


def ide_devices(p: Profile) -> list[tuple[str | int, ...]]:
    """The key paths of the devices that take an IDE slot, in the order they are placed."""
    a = archmod.for_machine(p.arch, p.machine)
    found: list[tuple[str | int, ...]] = [("disks", i, "interface")
                                          for i, d in enumerate(p.disks) if d.interface == "ide"]
    if a.cdrom_bus == "ide" and p.cdrom:
        found.append(("cdrom",))
    if p.cloud_init and p.cloud_init.interface == "ide":      # else a virtio disk or SCSI CD
        found.append(("cloud_init", "interface"))
    return found


def _check_ide_slots(p: Profile, ctx: Ctx) -> None:
    a = archmod.for_machine(p.arch, p.machine)
    slots = len(archmod.ide_slots(a, p.machine))
    devices = ide_devices(p)
    if len(devices) > slots:
        ctx.error(devices[slots], f"more IDE devices than the {p.machine or a.machine} machine "
                                  f"has slots for ({slots})",
                  hint="use interface: virtio (or scsi) for the other disks")


def _check_networks(p: Profile, ctx: Ctx) -> None:
    """Keys that belong to one network type, names and bridges, and forwards that collide."""
    bound: dict[str, tuple[int, int]] = {}
    for i, net in enumerate(p.network):
        if net.type != "user":
            for key in USER_ONLY:
                if getattr(net, key) not in (None, (), False):
                    ctx.error(("network", i, key), f"{key} is for type: user, not "
                                                   f"type: {net.type}")
        if net.name and net.type not in ("isolated", "nat"):
            ctx.error(("network", i, "name"), f"name is for type: isolated or nat, not "
                                              f"type: {net.type}")
        if net.type == "isolated" and not net.name:
            ctx.error(("network", i), "type: isolated needs the network's name",
                      hint="name: lab1 (guests with the same name share the network)")
        if net.bridge and net.type != "bridge":
            ctx.error(("network", i, "bridge"), f"bridge is for type: bridge, not "
                                                f"type: {net.type}")
        if net.type == "bridge" and not net.bridge:
            ctx.error(("network", i), "type: bridge needs the host bridge's name",
                      hint="bridge: br0")
        if net.dhcpstart:
            within = ipaddress.IPv4Network(net.net or "10.0.2.0/24")
            if ipaddress.IPv4Address(net.dhcpstart) not in within:
                ctx.error(("network", i, "dhcpstart"),
                          f"{net.dhcpstart} is not in the guest network {within}")
        for j, fwd in enumerate(net.forward):
            proto, haddr, rest = fwd.split(":", 2)
            key = f"{proto}:{haddr}:{rest.split('-')[0]}"
            if key in bound:
                ctx.error(("network", i, "forward", j),
                          f"host port {rest.split('-')[0]}/{proto} on {haddr} is forwarded "
                          "twice")
            bound.setdefault(key, (i, j))


def referenced_files(profile: Profile) -> Iterable[tuple[Location, str, str]]:
    """(location, what, path) for every file the profile needs to exist."""
    if profile.kernel:
        for key in ("path", "initrd", "dtb"):
            value = getattr(profile.kernel, key)
            if value:
                yield profile.location("kernel", key), f"kernel {key}", value
    for i, disk in enumerate(profile.disks):
        if disk.backing:
            yield profile.location("disks", i, "backing"), "backing image", disk.backing
        elif not disk.size:           # a disk with a size is created when missing
            yield profile.location("disks", i, "path"), "disk", disk.path
    for i, share in enumerate(profile.shares):
        yield profile.location("shares", i, "path"), "shared directory", share.path
    if profile.cloud_init and profile.cloud_init.user_data_file:
        yield (profile.location("cloud_init", "user_data_file"), "user-data file",
               profile.cloud_init.user_data_file)
    if profile.cloud_init:
        for i, key in enumerate(profile.cloud_init.ssh_authorized_keys):
            if is_key_file(key):
                yield (profile.location("cloud_init", "ssh_authorized_keys", i),
                       "public key file", key)
    for i, net in enumerate(profile.network):
        if net.tftp:
            yield profile.location("network", i, "tftp"), "TFTP directory", net.tftp
    if profile.cdrom:
        yield profile.location("cdrom"), "CD-ROM image", profile.cdrom
    if profile.firmware not in (None, "bios", "uefi"):
        yield profile.location("firmware"), "firmware", profile.firmware


