"""The profile: one YAML file describes one VM.

`load(path, overrides)` reads a profile (following `extends:`), applies `--set key.path=value`
overrides and returns an immutable, typed `Profile`. Every error names the file, the key path
and the line. The table `PROFILE` below is the public contract of profile keys: it drives
validation, the model and `kvmrun schema`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from kvmrun import arch as archmod
from kvmrun.errors import Location, ProfileError
from kvmrun.spec import (COMMAND_LINE, Bool, Ctx, Either, Enum, Field, FilePath, Int, List, Obj,
                         Size, Spec, Str, defaults, suggest, type_name)
from kvmrun.yamlsrc import KeyPath, Lines, load_yaml, parse_scalar

from kvmrun.paths import NAME_RE  # noqa: E402  (VM names are run-directory names)
MAX_NAME = 64
DISK_INTERFACES = ("virtio", "ide", "scsi", "nvme", "sd")
DEVICES = ("rng", "balloon", "agent", "tablet")
ALWAYS_WRITABLE = {"ide": "an IDE disk", "sd": "an SD card"}   # QEMU refuses read-only ones


# ---------------------------------------------------------------- the typed model

@dataclass(frozen=True)
class Kernel:
    path: str
    initrd: str | None = None
    append: str | None = None
    dtb: str | None = None


@dataclass(frozen=True)
class Disk:
    path: str = ""                   # or pool + volume
    format: str | None = None
    interface: str = "virtio"
    cache: str | None = None
    readonly: bool = False
    size: int | None = None          # MiB: create the image on first start when missing
    backing: str | None = None       # a qcow2 overlay on this base image
    ephemeral: bool = False          # writes go to an overlay deleted when the guest stops
    pool: str | None = None          # a storage pool (kvmrun pool define) …
    volume: str | None = None        # … and the volume in it: the path is resolved at load


@dataclass(frozen=True)
class Share:
    path: str
    tag: str
    readonly: bool = False
    security_model: str = "none"


@dataclass(frozen=True)
class CloudInit:
    user_data: str | None = None
    user_data_file: str | None = None
    meta_data: str | None = None
    network_config: str | None = None
    hostname: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    password: str | None = None


@dataclass(frozen=True)
class Network:
    type: str = "user"
    forward: tuple[str, ...] = ()
    mac: str | None = None
    model: str | None = None
    name: str | None = None          # isolated / nat: the named network
    bridge: str | None = None        # bridge: an existing host bridge
    restrict: bool = False           # user: the guest reaches nothing beyond QEMU's NAT
    net: str | None = None           # user: the guest address range, 10.0.2.0/24
    dhcpstart: str | None = None     # user: first address handed out by DHCP
    tftp: str | None = None          # user: directory served over TFTP
    bootfile: str | None = None      # user: boot file announced by DHCP (network boot)


@dataclass(frozen=True)
class Shutdown:
    timeout: int = 60
    method: str = "acpi"
    command: str = "poweroff"


@dataclass(frozen=True)
class Ready:
    console: str | None = None
    timeout: int = 300


@dataclass(frozen=True)
class Profile:
    name: str
    arch: str = field(default_factory=archmod.host_arch)
    description: str | None = None
    uuid: str | None = None
    machine: str | None = None
    accel: str = "auto"
    cpu: str | None = None
    smp: int = 1
    memory: int = 1024
    boot: str | None = None
    kernel: Kernel | None = None
    firmware: str | None = None
    disks: tuple[Disk, ...] = ()
    cdrom: str | None = None
    shares: tuple[Share, ...] = ()
    cloud_init: CloudInit | None = None
    network: tuple[Network, ...] = (Network(),)
    display: str = "none"
    serial: str = "log"
    devices: tuple[str, ...] = ("rng",)
    shutdown: Shutdown = Shutdown()
    ready: Ready = Ready()
    gdb: str | None = None
    halted: bool = False
    semihosting: bool = False
    qemu_args: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)
    lines: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def vm_uuid(self) -> str:
        """The profile's uuid, else one derived from the name (stable across hosts)."""
        return self.uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"kvmrun:{self.name}"))

    def location(self, *path: str | int) -> Location:
        probe: KeyPath = tuple(path)
        while probe not in self.lines and probe:
            probe = probe[:-1]
        file, line = self.lines.get(probe, (self.source or "<profile>", None))
        return Location(file, tuple(path), line)


# ---------------------------------------------------------------- value specs

class ArchSpec(Spec):
    def check(self, value, ctx, path):
        found = archmod.canonical(str(value))
        if found is None:
            return ctx.error(path, f"{value!r} is not a known architecture"
                             + suggest(str(value), list(archmod.ARCHES)),
                             hint="known: " + ", ".join(archmod.ARCHES))
        return found

    def schema(self):
        return {"enum": sorted(set(archmod.ARCHES) | set(archmod._ALIASES))}


class Boot(Str):
    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is not None and len(set(value)) != len(value):
            return ctx.error(path, f"{value!r} names a device twice")
        return value


_FWD_RE = re.compile(r"(?:(tcp|udp):)?(?:(\d{1,3}(?:\.\d{1,3}){3})?:)?(\d+)[-:]"
                     r"(?:(\d{1,3}(?:\.\d{1,3}){3})?:)?(\d+)")


class Forward(Spec):
    """A port forward, normalised to QEMU's hostfwd form `tcp:127.0.0.1:2222-:22`.

    Accepts `2222:22`, `tcp::2222-:22`, `udp:0.0.0.0:5353-:53`; binds 127.0.0.1 unless an
    address is given."""

    def check(self, value, ctx, path):
        m = _FWD_RE.fullmatch(str(value).strip())
        if not m or isinstance(value, bool):
            return ctx.error(path, f"{value!r} is not a port forward",
                             hint="write HOSTPORT:GUESTPORT (2222:22) or QEMU's form "
                                  "tcp:127.0.0.1:2222-:22")
        proto, haddr, hport, gaddr, gport = m.groups()
        for port in (hport, gport):
            if not 1 <= int(port) <= 65535:
                return ctx.error(path, f"port {port} is out of range (1 to 65535)")
        return f"{proto or 'tcp'}:{haddr or '127.0.0.1'}:{hport}-{gaddr or ''}:{gport}"

    def schema(self):
        return {"type": "string"}


class Gdb(Spec):
    """true (port 1234), a port, or HOST:PORT; normalised to `HOST:PORT`."""

    def check(self, value, ctx, path):
        if value is False:
            return None
        if value is True:
            return "127.0.0.1:1234"
        m = re.fullmatch(r"(?:([\w.-]+|\[[0-9a-fA-F:]+\]):)?(\d+)", str(value))
        if not m or not 1 <= int(m.group(2)) <= 65535:
            return ctx.error(path, f"{value!r} is not a gdb port",
                             hint="true, a port (1234) or HOST:PORT (127.0.0.1:1234)")
        return f"{m.group(1) or '127.0.0.1'}:{m.group(2)}"

    def schema(self):
        return {"anyOf": [{"type": "boolean"}, {"type": "integer"}, {"type": "string"}]}


class Regex(Str):
    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                return ctx.error(path, f"not a valid regular expression: {err}")
        return value


def _is_keyword(*words: str):
    return lambda v: isinstance(v, str) and v in words


KERNEL = Obj(Kernel, {
    "path": Field(FilePath(), "kernel image (relative to the profile's directory)",
                  required=True),
    "initrd": Field(FilePath(), "initial ramdisk"),
    "append": Field(Str(), "kernel command line"),
    "dtb": Field(FilePath(), "device tree blob"),
}, "direct kernel boot")

DISK = Obj(Disk, {
    "path": Field(FilePath(), "disk image or block device (or pool + volume)"),
    "format": Field(Enum(("qcow2", "raw")), "image format; default: detected with qemu-img"),
    "interface": Field(Enum(DISK_INTERFACES), "how the guest sees the disk"),
    "cache": Field(Enum(("none", "writeback", "writethrough", "directsync", "unsafe")),
                   "host cache mode; default: QEMU's (writeback)"),
    "readonly": Field(Bool(), "attach read-only"),
    "size": Field(Size(1, 64 * 1024 * 1024), "create the image with this size on first start "
                                             "when it is missing (20G)"),
    "backing": Field(FilePath(), "base image: the disk is a qcow2 overlay on it (created on "
                                 "first start when missing; the base is never written)"),
    "ephemeral": Field(Bool(), "throwaway: writes go to an overlay in the run directory that is "
                               "deleted when the guest stops"),
    "pool": Field(Str(NAME_RE, MAX_NAME, "a pool name"), "storage pool holding the volume "
                                                         "(kvmrun pool define)"),
    "volume": Field(Str(r"[A-Za-z0-9][A-Za-z0-9._+-]*", what="a volume (file) name"),
                    "volume (image file name) in the pool"),
})

SHARE = Obj(Share, {
    "path": Field(FilePath(), "host directory to share (virtio-9p)", required=True),
    "tag": Field(Str(r"[A-Za-z0-9_.-]{1,31}", what="a mount tag (letters, digits, . _ -, at "
                                                  "most 31)"),
                 "mount tag the guest mounts: mount -t 9p -o trans=virtio TAG /mnt",
                 required=True),
    "readonly": Field(Bool(), "the guest cannot write"),
    "security_model": Field(Enum(("none", "passthrough", "mapped-xattr", "mapped-file")),
                            "how guest file ownership maps to the host (QEMU's security_model)"),
})


class YamlText(Spec):
    """Text, or a mapping/list that is turned into YAML text (`prefix` first)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def check(self, value, ctx, path):
        if isinstance(value, (dict, list)):
            return self.prefix + yaml.safe_dump(value, sort_keys=False,
                                                default_flow_style=False)
        if isinstance(value, str):
            return value
        return ctx.error(path, f"expected text or a mapping, found {value!r}")

    def schema(self):
        return {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "array"}]}


CLOUD_INIT = Obj(CloudInit, {
    "user_data": Field(YamlText("#cloud-config\n"),
                       "user-data: text (#cloud-config …, a script) or a mapping "
                       "(written as #cloud-config)"),
    "user_data_file": Field(FilePath(), "user-data read from this file"),
    "meta_data": Field(YamlText(), "meta-data: text or a mapping (instance-id and "
                                   "local-hostname are filled in)"),
    "network_config": Field(YamlText(), "network-config (version 1 or 2): text or a mapping"),
    "hostname": Field(Str(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*",
                          what="a host name"), "the guest's host name; default: the VM name"),
    "ssh_authorized_keys": Field(List(Str(), scalar_ok=True),
                                 "public keys for the default user (text or a .pub file path)"),
    "password": Field(Str(), "password of the default user (ssh password login enabled)"),
}, "a NoCloud seed attached as a read-only CD-ROM labelled cidata")

NET_TYPES = ("user", "isolated", "bridge", "nat", "none")
NET_NAME_RE = r"[A-Za-z0-9]+([._-][A-Za-z0-9]+)*"
USER_ONLY = ("forward", "restrict", "net", "dhcpstart", "tftp", "bootfile")


class IPv4Net(Str):
    """An IPv4 network in CIDR form (10.0.2.0/24); host bits must be zero."""

    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is None:
            return None
        import ipaddress
        try:
            net = ipaddress.IPv4Network(value)
        except ValueError as err:
            return ctx.error(path, f"{value!r} is not an IPv4 network: {err}",
                             hint="write ADDRESS/PREFIX, e.g. 10.0.2.0/24")
        if net.prefixlen > 29:
            return ctx.error(path, f"{value!r} is too small (a /29 at most)")
        return str(net)


class IPv4Addr(Str):
    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is None:
            return None
        import ipaddress
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            return ctx.error(path, f"{value!r} is not an IPv4 address")


NETWORK = Obj(Network, {
    "type": Field(Enum(NET_TYPES),
                  "user: NAT through QEMU, no root needed; isolated: a named network of "
                  "guests only (no root); bridge: a tap on a host bridge; nat: a "
                  "kvmrun-managed NAT network with DHCP (root); none"),
    "name": Field(Str(NET_NAME_RE, 32, "a network name (letters, digits and . _ - between "
                                       "them, at most 32)"),
                  "isolated, nat: the named network (nat: default 'default')"),
    "bridge": Field(Str(r"[A-Za-z0-9_.-]{1,15}", what="a bridge name (at most 15 "
                                                      "characters)"),
                    "bridge: the existing host bridge the guest's tap joins"),
    "restrict": Field(Bool(), "user: isolate the guest from the host and the outside "
                              "(forwards still work)"),
    "net": Field(IPv4Net(what="an IPv4 network"), "user: the guest address range "
                                                  "(default 10.0.2.0/24)"),
    "dhcpstart": Field(IPv4Addr(what="an IPv4 address"),
                       "user: first address QEMU's DHCP hands out (default .15)"),
    "tftp": Field(FilePath(), "user: a directory QEMU serves over TFTP"),
    "bootfile": Field(Str(r"[^,\s]+", what="a file name"),
                      "user: the boot file DHCP announces (network boot with boot: n)"),
    "forward": Field(List(Forward(), scalar_ok=True),
                     "port forwards HOSTPORT:GUESTPORT or tcp:ADDR:HOSTPORT-:GUESTPORT"),
    "mac": Field(Str(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", what="a MAC address"),
                 "MAC address; default: stable, derived from the VM name"),
    "model": Field(Str(r"[A-Za-z0-9_-]+", what="a NIC model"),
                   "NIC model; default per architecture (virtio-net)"),
})

SHUTDOWN = Obj(Shutdown, {
    "timeout": Field(Int(1, 86400), "seconds of graceful shutdown before escalation"),
    "method": Field(Enum(("acpi", "agent", "console", "none")),
                    "how to ask the guest to power off"),
    "command": Field(Str(), "what `method: console` types on the serial console"),
})

READY = Obj(Ready, {
    "console": Field(Regex(), "regular expression; the guest is ready when its serial console "
                              "prints a match"),
    "timeout": Field(Int(1, 86400), "seconds to wait for readiness"),
})

PROFILE = Obj(Profile, {
    "name": Field(Str(NAME_RE, MAX_NAME, "a valid VM name (letters, digits and . _ - "
                                         "between them)"),
                  "VM name; default: the file name without .yaml", required=True),
    "extends": Field(FilePath(), "a base profile this one starts from (relative path)"),
    "description": Field(Str(), "free text"),
    "uuid": Field(Str(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", what="a UUID"),
                  "SMBIOS UUID; default: derived from the name"),
    "arch": Field(ArchSpec(), "guest architecture; default: the host's"),
    "machine": Field(Str(r"[A-Za-z0-9._-]+", what="a machine type"),
                     "QEMU machine type; default per arch (q35, virt, …)"),
    "accel": Field(Enum(("auto", "kvm", "tcg")),
                   "auto: KVM when the arch matches the host and /dev/kvm works, else TCG"),
    "cpu": Field(Str(r"[A-Za-z0-9._+=,-]+", what="a CPU model"),
                 "CPU model; default: host under KVM, max under TCG"),
    "smp": Field(Int(1, 1024), "number of vCPUs"),
    "memory": Field(Size(16, 16 * 1024 * 1024), "RAM: MiB as a number, or 512M, 2G"),
    "boot": Field(Boot(r"[cdn]{1,3}", what="a boot order of c (disk), d (cdrom), n (network)"),
                  "boot order: c disk, d cdrom, n network, e.g. dc"),
    "kernel": Field(KERNEL, "direct kernel boot"),
    "firmware": Field(Either(((_is_keyword("bios", "uefi"), Enum(("bios", "uefi"))),
                              (lambda v: isinstance(v, str), FilePath())),
                             "bios, uefi or a firmware file"),
                      "bios | uefi | path to a firmware image"),
    "disks": Field(List(DISK), "disks, in order"),
    "cdrom": Field(FilePath(), "ISO image attached as CD-ROM"),
    "shares": Field(List(SHARE), "host directories shared with the guest (virtio-9p)"),
    "cloud_init": Field(CLOUD_INIT, "cloud-init NoCloud seed (read-only CD-ROM)"),
    "network": Field(List(NETWORK), "NICs; default: one user-mode NIC; [] for none"),
    "display": Field(Enum(("none", "vnc", "gtk", "sdl", "spice")), "graphical console"),
    "serial": Field(Enum(("log", "stdio", "socket", "none")),
                    "serial console: log (socket + log file), stdio, socket, none"),
    "devices": Field(List(Enum(DEVICES)), "virtio extras: " + ", ".join(DEVICES)),
    "shutdown": Field(SHUTDOWN, "graceful shutdown"),
    "ready": Field(READY, "when a started guest counts as ready"),
    "gdb": Field(Gdb(), "gdb stub: true, a port, or HOST:PORT (localhost by default)"),
    "halted": Field(Bool(), "start with vCPUs stopped (resume with `kvmrun resume` or gdb)"),
    "semihosting": Field(Bool(), "enable Arm/RISC-V semihosting"),
    "qemu_args": Field(List(Str()), "extra QEMU arguments, appended verbatim"),
}, "A kvmrun VM profile")

# ---------------------------------------------------------------- loading

def load(source: str | Path, overrides: Sequence[str] = (), *, display: str | None = None
         ) -> Profile:
    """Load a profile file, follow `extends`, apply `--set` overrides, validate."""
    path = Path(source)
    data, lines = _load_with_extends(path, display or str(source), [])
    if "name" not in data:
        stem = path.name.removesuffix(".yaml").removesuffix(".yml")
        if re.fullmatch(NAME_RE, stem):
            data["name"] = stem
    return from_mapping(data, lines, display or str(source), overrides, source=str(path))


def from_mapping(data: Any, lines: Lines, display: str, overrides: Sequence[str] = (),
                 source: str | None = None) -> Profile:
    """Validate a mapping (from YAML or command-line flags) into a Profile."""
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_set(data, lines, assignment)
    ctx = Ctx(lines, display)
    if not isinstance(data, dict):
        raise ProfileError(Location(display, line=lines.get((), (None, None))[1]),
                           f"a profile must be a mapping of keys, found {type_name(data)}")
    data.pop("extends", None)
    profile = PROFILE.check(data, ctx, ())
    if profile is not None:
        _check_combinations(profile, ctx)
        profile = _resolve_pools(profile, ctx)
    ctx.raise_errors()
    return dataclasses.replace(profile, source=source, lines=dict(lines))


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
    if "tablet" in p.devices:
        ctx.error(("devices",), f"{why}: no USB controller for the tablet")
    if board.virtio is None:
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
    return [ProfileError(p.location("shutdown", "method"), problem, POWER_BUTTON_HINT)
            ] if problem else []


def _resolve_pools(p: Profile, ctx: Ctx) -> Profile:
    """Disks given as pool + volume get the volume's path (from the pool's definition)."""
    disks = []
    for i, disk in enumerate(p.disks):
        if disk.pool and disk.volume:
            from kvmrun import pools
            try:
                disk = pools.resolve_disk(disk)      # an lvm volume: /dev/VG/VOLUME, raw
            except pools.PoolError as err:
                ctx.error(("disks", i, err.key), err.message, err.hint)
        elif disk.pool or disk.volume:
            ctx.error(("disks", i), "pool and volume go together",
                      hint="write both (pool: NAME, volume: FILE), or a path")
        elif not disk.path:
            ctx.error(("disks", i), "missing required key 'path'")
        disks.append(disk)
    return dataclasses.replace(p, disks=tuple(disks))


def _check_combinations(p: Profile, ctx: Ctx) -> None:
    """Values that are each valid but that QEMU refuses together."""
    a = archmod.ARCHES.get(p.arch)
    _check_board(p, ctx)
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
    _check_networks(p, ctx)
    tags = [s.tag for s in p.shares]
    for i, share in enumerate(p.shares):
        if tags.index(share.tag) != i:
            ctx.error(("shares", i, "tag"), f"tag {share.tag!r} is used twice")


def _check_networks(p: Profile, ctx: Ctx) -> None:
    """Keys that belong to one network type, names and bridges, and forwards that collide."""
    import ipaddress
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


def _load_with_extends(path: Path, display: str, stack: list[Path]) -> tuple[dict, Lines]:
    data, lines = load_yaml(path, display)
    if not isinstance(data, dict):
        raise ProfileError(Location(display, line=1),
                           f"a profile must be a mapping of keys, found {type_name(data)}")
    base_ref = data.get("extends")
    if base_ref is None:
        return data, lines
    where = Location(display, ("extends",), lines[("extends",)][1])
    if not isinstance(base_ref, str) or not base_ref or "\0" in base_ref:
        raise ProfileError(where, "expected a file path")
    base_path = (path.resolve().parent / os.path.expanduser(base_ref)).resolve()
    chain = stack + [path.resolve()]
    if base_path in chain:
        loop = " -> ".join(p.name for p in chain + [base_path])
        raise ProfileError(where, f"extends loop: {loop}")
    if not base_path.is_file():
        raise ProfileError(where, f"base profile {str(base_path)!r} "
                                  + ("is not a file" if base_path.exists() else "not found"))
    base, base_lines = _load_with_extends(base_path, str(base_path), chain)
    base.pop("name", None)          # a VM's name is its own, never inherited
    del data["extends"]
    # values this file replaces take its lines; the rest keep the base's (and so a base's
    # relative paths resolve against the base's directory)
    merged_lines = {k: v for k, v in base_lines.items() if not _replaces(data, k)}
    merged_lines.update(lines)
    return _merge(base, data), merged_lines


def _replaces(over: dict, key: KeyPath) -> bool:
    """Whether merging `over` onto a base replaces the base's value at `key` (mappings merge
    key by key, anything else is replaced whole)."""
    node: Any = over
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return True


def _merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return over


def apply_set(data: dict, lines: Lines, assignment: str) -> None:
    """Apply `key.path=value` (value parsed as YAML) in place; indexes are numbers."""
    where = f"{COMMAND_LINE} {assignment}"
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ProfileError(Location(where), "expected KEY=VALUE, e.g. memory=4G or "
                                            "disks.0.cache=unsafe")
    try:
        value = parse_scalar(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p
                              for p in key.split(".")]
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or part > len(node):
                raise ProfileError(Location(where, tuple(parts[: i + 1])),
                                   f"no item {part} in a list of {len(node)}")
            if part == len(node):
                node.append({} if not last else None)
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise ProfileError(Location(where, tuple(parts[: i + 1])),
                                   "not a list, cannot index it with a number")
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(parts[i + 1], int) else {}
        else:
            raise ProfileError(Location(where, tuple(parts[:i])), "is not a mapping or list")
        if last:
            node[part] = value
        else:
            node = node[part]
    prefix = tuple(parts)
    for existing in [k for k in lines if k[: len(prefix)] == prefix]:
        del lines[existing]
    lines[prefix] = (where, None)


# ---------------------------------------------------------------- after loading

def to_dict(profile: Profile) -> dict:
    """A self-contained mapping of the profile (defaults omitted, paths absolute): the
    `virsh dumpxml` of kvmrun. Loading it back gives an equal Profile."""
    return _strip(profile, PROFILE)


def _strip(obj: Any, spec: Spec) -> Any:
    if isinstance(spec, Obj):
        out = {}
        plain = defaults(spec.cls)
        for key, fld in spec.fields.items():
            value = getattr(obj, key, None)
            if value is None or (key in plain and value == plain[key]):
                continue
            out[key] = _strip(value, fld.spec)
        return out
    if isinstance(spec, List):
        return [_strip(v, spec.item) for v in obj]
    return obj


def dump_yaml(profile: Profile) -> str:
    return yaml.safe_dump(to_dict(profile), sort_keys=False, default_flow_style=False)


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
    if profile.cdrom:
        yield profile.location("cdrom"), "CD-ROM image", profile.cdrom
    if profile.firmware not in (None, "bios", "uefi"):
        yield profile.location("firmware"), "firmware", profile.firmware


def missing_files(profile: Profile) -> list[ProfileError]:
    return [ProfileError(loc, f"{what} {path!r} not found")
            for loc, what, path in referenced_files(profile) if not Path(path).exists()]


def json_schema() -> dict:
    schema = PROFILE.schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kvmrun profile"
    return schema
