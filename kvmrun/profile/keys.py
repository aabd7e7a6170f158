"""The profile's keys: the table `PROFILE` below is the public contract of profile keys. It
drives validation, the model and `kvmrun schema`; a new key is one row here (and a field in
`kvmrun.profile.model`).
"""

from __future__ import annotations

import ipaddress
import re

import yaml

from kvmrun import arch as archmod
from kvmrun.paths import MAX_NAME, NAME_RE
from kvmrun.profile.model import (CloudInit, Disk, Kernel, Limits, Network, Profile, Ready,
                                  Share, Shutdown, Ssh, is_key_file)
from kvmrun.profile.spec import (Bool, Either, Enum, Field, FilePath, Int, List, Obj, Percent,
                                 Size, Spec, Str, shown, suggest)

DISK_INTERFACES = ("virtio", "ide", "scsi", "nvme", "sd")
SEED_INTERFACES = ("virtio", "ide", "scsi")
DEVICES = ("rng", "balloon", "agent", "tablet")
NET_TYPES = ("user", "isolated", "bridge", "nat", "none")
FIRMWARES = ("bios", "uefi", "uefi-secure")
USER_ONLY = ("forward", "restrict", "net", "dhcpstart", "tftp", "bootfile")


# ---------------------------------------------------------------- value specs

class ArchSpec(Spec):
    def check(self, value, ctx, path):
        found = archmod.canonical(str(value))
        if found is None:
            return ctx.error(path, f"{shown(value)} is not a known architecture"
                             + suggest(str(value), list(archmod.ARCHES)),
                             hint="known: " + ", ".join(archmod.ARCHES))
        return found

    def schema(self):
        return {"enum": sorted(set(archmod.ARCHES) | set(archmod._ALIASES))}


class Boot(Str):
    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is not None and len(set(value)) != len(value):
            return ctx.error(path, f"{shown(value)} names a device twice")
        return value


_FWD_RE = re.compile(r"(?:(tcp|udp):)?(?:(\d{1,3}(?:\.\d{1,3}){3})?:)?(\d{1,5})[-:]"
                     r"(?:(\d{1,3}(?:\.\d{1,3}){3})?:)?(\d{1,5})", re.ASCII)  # no '٣'
GDB_UNIX = "unix"         # gdb: true -> a unix socket in the run directory (gdb.sock)


class Forward(Spec):
    """A port forward, normalised to QEMU's hostfwd form `tcp:127.0.0.1:2222-:22`.

    Accepts `2222:22`, `tcp::2222-:22`, `udp:0.0.0.0:5353-:53`; binds 127.0.0.1 unless an
    address is given."""

    def check(self, value, ctx, path):
        m = _FWD_RE.fullmatch(str(value).strip())
        if not m or isinstance(value, bool):
            return ctx.error(path, f"{shown(value)} is not a port forward",
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
    """true (a unix socket only this user can reach: `gdb.sock` in the run directory), a
    port, or HOST:PORT (TCP, which any local user can reach); normalised to `unix` or
    `HOST:PORT`."""

    def check(self, value, ctx, path):
        if value is False:
            return None
        if value is True or value == GDB_UNIX:
            return GDB_UNIX
        m = re.fullmatch(r"(?:([\w.-]+|\[[0-9a-fA-F:]+\]):)?(\d{1,5})", str(value), re.ASCII)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            return ctx.error(path, f"{shown(value)} is not a gdb port",
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

NFS_URL = r"nfs://[A-Za-z0-9.-]+(/[A-Za-z0-9._+,-]+)+"
# a base image may also be a volume QEMU opens over NFS itself (a userspace nfs pool's)
IMAGE = Either(((lambda v: isinstance(v, str) and v.startswith("nfs://"),
                 Str(NFS_URL, what="an nfs://SERVER/EXPORT/FILE URL")),
                (lambda v: isinstance(v, str), FilePath())), "a file path or nfs:// URL")

DISK = Obj(Disk, {
    "path": Field(FilePath(), "disk image or block device (or pool + volume)"),
    "format": Field(Enum(("qcow2", "raw")), "image format; default: detected with qemu-img"),
    "interface": Field(Enum(DISK_INTERFACES), "how the guest sees the disk"),
    "cache": Field(Enum(("none", "writeback", "writethrough", "directsync", "unsafe")),
                   "host cache mode; default: QEMU's (writeback)"),
    "readonly": Field(Bool(), "attach read-only"),
    "size": Field(Size(1, 64 * 1024 * 1024), "create the image with this size on first start "
                                             "when it is missing (20G)"),
    "backing": Field(IMAGE, "base image: the disk is a qcow2 overlay on it (created on "
                            "first start when missing; the base is never written)"),
    "ephemeral": Field(Bool(), "throwaway: writes go to an overlay in the run directory that is "
                               "deleted when the guest stops"),
    "pool": Field(Str(NAME_RE, MAX_NAME, "a pool name"), "storage pool holding the volume "
                                                         "(kvmrun pool define)"),
    "volume": Field(Str(r"[A-Za-z0-9][A-Za-z0-9._+-]*", what="a volume (file) name"),
                    "volume (image file name) in the pool"),
    "werror": Field(Enum(("enospc", "stop", "report", "ignore")),
                    "on a write error: stop pauses the guest (kvmrun status says why; "
                    "kvmrun resume retries), report passes it to the guest, enospc stops "
                    "on a full disk only; default: QEMU's (enospc)"),
    "rerror": Field(Enum(("stop", "report", "ignore")),
                    "on a read error (stop, report, ignore); default: QEMU's (report)"),
})

SHARE_TYPES = ("9p", "virtiofs")

SHARE = Obj(Share, {
    "path": Field(FilePath(), "host directory to share", required=True),
    "tag": Field(Str(r"[A-Za-z0-9_.-]{1,31}", what="a mount tag (letters, digits, . _ -, at "
                                                  "most 31)"),
                 "mount tag the guest mounts: mount -t 9p -o trans=virtio TAG /mnt (9p), "
                 "mount -t virtiofs TAG /mnt (virtiofs)", required=True),
    "type": Field(Enum(SHARE_TYPES),
                  "9p: virtio-9p served by QEMU (no root needed; not in Debian's cloud "
                  "kernel); virtiofs: a virtiofsd helper per share (root; faster, POSIX "
                  "semantics, in every cloud kernel); default 9p"),
    "readonly": Field(Bool(), "the guest cannot write (9p only)"),
    "security_model": Field(Enum(("none", "passthrough", "mapped-xattr", "mapped-file")),
                            "9p: how guest file ownership maps to the host (QEMU's "
                            "security_model)"),
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
        return ctx.error(path, f"expected text or a mapping, found {shown(value)}")

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
    "ssh_authorized_keys": Field(List(Either(((lambda v: isinstance(v, str) and is_key_file(v),
                                               FilePath()),
                                              (lambda v: True, Str())),
                                             "a public key or a .pub file"), scalar_ok=True),
                                 "public keys for the default user (text, or a .pub file "
                                 "path relative to the profile)"),
    "password": Field(Str(), "password of the default user (ssh password login enabled)"),
    "interface": Field(Enum(SEED_INTERFACES),
                       "where the seed goes: virtio (a read-only virtio-blk disk, found by "
                       "every cloud kernel), ide or scsi (a CD-ROM)"),
}, "a NoCloud seed labelled cidata (a read-only virtio disk by default)")



class IPv4Net(Str):
    """An IPv4 network in CIDR form (10.0.2.0/24); host bits must be zero."""

    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is None:
            return None
        try:
            net = ipaddress.IPv4Network(value)
        except ValueError as err:
            return ctx.error(path, f"{shown(value)} is not an IPv4 network: {err}",
                             hint="write ADDRESS/PREFIX, e.g. 10.0.2.0/24")
        if net.prefixlen > 29:
            return ctx.error(path, f"{shown(value)} is too small (a /29 at most)")
        return str(net)


class IPv4Addr(Str):
    def check(self, value, ctx, path):
        value = super().check(value, ctx, path)
        if value is None:
            return None
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            return ctx.error(path, f"{shown(value)} is not an IPv4 address")


NETWORK = Obj(Network, {
    "type": Field(Enum(NET_TYPES),
                  "user: NAT through QEMU, no root needed; isolated: a named network of "
                  "guests only (no root); bridge: a tap on a host bridge; nat: a "
                  "kvmrun-managed NAT network with DHCP (root); none"),
    "name": Field(Str(NAME_RE, 32, "a network name (letters, digits and . _ - between "
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
    "cloud_init": Field(Bool(), "ready when cloud-init has finished (its final console line "
                                "'Cloud-init v. … finished'); instead of console"),
})

SSH = Obj(Ssh, {
    "user": Field(Str(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", what="a user name"),
                  "login name for `kvmrun ssh` (Debian's cloud images: debian)"),
    "identity": Field(FilePath(), "private key for `kvmrun ssh`; default: the private half of "
                                  "a cloud_init.ssh_authorized_keys .pub file"),
})

LIMITS = Obj(Limits, {
    "cpu_weight": Field(Int(1, 10000), "CPU share against other processes (cgroup cpu.weight; "
                                       "100 is the kernel's default)"),
    "cpu_max": Field(Percent(1, 1024 * 100), "CPU time cap in percent of one CPU, like "
                                             "systemd's CPUQuota: 50% or 200% (cpu.max)"),
    "memory_max": Field(Size(16, 16 * 1024 * 1024), "memory cap for QEMU as a whole (guest RAM "
                                                   "plus QEMU's own), above memory (memory.max)"),
    "io_weight": Field(Int(1, 10000), "disk I/O share (io.weight; 100 is the default)"),
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
    "firmware": Field(Either(((_is_keyword(*FIRMWARES), Enum(FIRMWARES)),
                              (lambda v: isinstance(v, str), FilePath())),
                             "bios, uefi, uefi-secure or a firmware file"),
                      "bios | uefi | uefi-secure (UEFI with Secure Boot) | path to a "
                      "firmware image"),
    "secure_boot": Field(Bool(), "UEFI Secure Boot (with firmware: uefi; the same as firmware: "
                                 "uefi-secure): OVMF's Secure Boot code, Microsoft's keys "
                                 "enrolled in the VM's variable store, SMM (q35 only)"),
    "disks": Field(List(DISK), "disks, in order"),
    "cdrom": Field(FilePath(), "ISO image attached as CD-ROM"),
    "shares": Field(List(SHARE), "host directories shared with the guest (virtio-9p or "
                                 "virtiofs)"),
    "cloud_init": Field(CLOUD_INIT, "cloud-init NoCloud seed (a read-only disk labelled "
                                    "cidata)"),
    "network": Field(List(NETWORK), "NICs; default: one user-mode NIC; [] for none"),
    "display": Field(Enum(("none", "vnc", "gtk", "sdl", "spice")), "graphical console"),
    "serial": Field(Enum(("log", "stdio", "socket", "none")),
                    "serial console: log (socket + log file), stdio, socket, none"),
    "serial_log_max": Field(Size(1, 64 * 1024), "rotate serial.log at this size (the "
                            "previous part is kept as serial.log.1); default 8M"),
    "devices": Field(List(Enum(DEVICES)), "virtio extras: " + ", ".join(DEVICES)),
    "shutdown": Field(SHUTDOWN, "graceful shutdown"),
    "ready": Field(READY, "when a started guest counts as ready"),
    "ssh": Field(SSH, "how `kvmrun ssh` logs in"),
    "gdb": Field(Gdb(), "gdb stub: true (a unix socket, gdb.sock in the run directory), or a port "
                 "or HOST:PORT (TCP on 127.0.0.1 by default: any local user can reach it)"),
    "halted": Field(Bool(), "start with vCPUs stopped (resume with `kvmrun resume` or gdb)"),
    "semihosting": Field(Bool(), "enable Arm/RISC-V semihosting"),
    "sandbox": Field(Bool(), "QEMU's seccomp sandbox (obsolete, set*id, spawn and resource "
                             "control denied); default true; false turns it off (a warning)"),
    "tpm": Field(Bool(), "a TPM 2.0 device (tpm-crb on x86, tpm-tis-device on Arm virt) "
                        "backed by a swtpm helper; its state is kept in the data directory "
                        "across restarts and moves with export"),
    "limits": Field(LIMITS, "resource limits through a cgroup v2 leaf of the guest's own "
                            "(refused where no cgroup v2 with these controllers is usable)"),
    "qemu_args": Field(List(Str()), "extra QEMU arguments, appended verbatim"),
}, "A kvmrun VM profile")
