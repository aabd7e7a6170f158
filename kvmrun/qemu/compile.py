"""Profile -> QEMU argv. Pure: no I/O, no environment, no clock.

`build(profile, host, paths)` takes the typed profile, host facts probed once elsewhere
(`kvmrun.qemu.host.probe`) and the guest's runtime paths, and returns the argv as a list of
strings with the facts it decided (accelerator, machine) and the argv of the guest's helper
daemons, which QEMU connects to as it starts (virtiofsd per virtiofs share, swtpm for a TPM:
run by the supervisor, kvmrun.guest.helpers); `compile()` returns QEMU's argv alone. Each
option and its value sit together; values built from user input escape commas the way QEMU
requires (`,` -> `,,`). Nothing ever goes through a shell.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvmrun import arch as archmod
from kvmrun.arch import Arch, HostFacts, ide_slots
from kvmrun.errors import HostError
from kvmrun.guest.agent import AGENT_PORT
from kvmrun.net.names import hub_socket, port_socket, stable_mac, tap_name
from kvmrun.paths import RunPaths
from kvmrun.profile import Profile
from kvmrun.records import record

Args = Iterator[str]


@record(frozen=True)
class HelperCommand:
    """A helper daemon the guest needs: its name (the run directory's helper-NAME.sock and
    .log), its argv, and the socket it listens on (QEMU connects to it)."""

    name: str
    argv: list[str]
    socket: str

    def to_json(self) -> dict:
        return {"name": self.name, "argv": list(self.argv), "socket": self.socket}


@record(frozen=True)
class Compiled:
    """The argv and what the compiler decided on the way (the launch record keeps these)."""

    argv: list[str]
    accel: str
    machine: str
    sandbox: str | None = None     # the -sandbox value, None when turned off
    helpers: tuple[HelperCommand, ...] = ()    # started before QEMU, in this order
    qemu_user: str | None = None   # the user QEMU drops to (-runas), None: it does not


def qemu_escape(value: str) -> str:
    """QEMU option values double their commas."""
    return str(value).replace(",", ",,")


def opts(*parts: str, **kw: str | int | bool | None) -> str:
    """opts('virtio-blk-pci', drive='d0', bootindex=1) -> 'virtio-blk-pci,drive=d0,bootindex=1'.
    None values are left out; booleans become on/off."""
    items = list(parts)
    for key, value in kw.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        items.append(f"{key.rstrip('_').replace('_', '-')}={value}")
    return ",".join(items)


def resolve_accel(profile: Profile, host: HostFacts) -> str:
    if host.forced_accel:
        return host.forced_accel
    if profile.accel != "auto":
        return profile.accel
    a = archmod.get(profile.arch)
    return "kvm" if a.kvm_possible(host.machine) and host.kvm else "tcg"


def boot_indexes(profile: Profile) -> dict[str, int]:
    """The boot order as bootindex per device class: 'dc' -> {'d': 0, 'c': 1}."""
    return {letter: i for i, letter in enumerate(profile.boot or "")}


def compile(profile: Profile, host: HostFacts, paths: RunPaths) -> list[str]:
    return build(profile, host, paths).argv


def build(profile: Profile, host: HostFacts, paths: RunPaths) -> Compiled:
    a = archmod.for_machine(profile.arch, profile.machine)
    accel = resolve_accel(profile, host)
    argv = [a.qemu]
    runas = runas_user(profile, host)
    # a QEMU that drops privileges keeps the descriptors root opened: with auto-read-only
    # on (-drive's default) it reopens a writable image by path whenever its writers
    # change (a migration's switch-over, `cont` after one), which that user may not do
    keep = False if runas else None
    for part in (_identity(profile), _machine(profile, a, accel),
                 _display(profile, a, paths), _firmware(profile, a, host, paths, keep),
                 _kernel(profile), _storage(profile, a, paths, keep),
                 _shares(profile, a, paths),
                 _network(profile, a, host, paths),
                 _serial(profile, paths), _devices(profile, a, paths),
                 _control(profile, paths)):
        argv.extend(part)
    if runas:
        argv += ["-run-with", f"user={runas}"] if host.run_with else ["-runas", runas]
    sandbox = sandbox_option(profile, host)
    if sandbox:
        argv += ["-sandbox", sandbox]
    argv.extend(profile.qemu_args)
    return Compiled(argv, accel, profile.machine or a.machine, sandbox,
                    tuple(_helpers(profile, host, paths)), runas)


def virtiofs_shares(p: Profile) -> list[int]:
    """The indexes of the shares served by virtiofsd."""
    return [i for i, share in enumerate(p.shares) if share.type == "virtiofs"]


def fuse_escape(value: str) -> str:
    """virtiofsd's -o values (FUSE's option syntax) escape backslashes and commas."""
    return str(value).replace("\\", "\\\\").replace(",", "\\,")


def _helper_binary(found: str | None, program: str, package: str) -> str:
    if not found:
        raise HostError(f"{program} not found", hint=f"install it: apt-get install {package}")
    return found


VIRTIOFSD_PACKAGE = "qemu-system-common (Debian 12: /usr/lib/qemu/virtiofsd) or virtiofsd"
SWTPM_PACKAGE = "swtpm swtpm-tools"


def _helpers(p: Profile, host: HostFacts, paths: RunPaths) -> Iterator[HelperCommand]:
    for i in virtiofs_shares(p):
        binary = _helper_binary(host.virtiofsd, "virtiofsd", VIRTIOFSD_PACKAGE)
        sock = str(paths.helper_socket(f"virtiofsd{i}"))
        yield HelperCommand(f"virtiofsd{i}", [
            binary, f"--socket-path={sock}", "-o", f"source={fuse_escape(p.shares[i].path)}",
            "-o", "cache=auto"], sock)
    if p.tpm:
        binary = _helper_binary(host.swtpm, "swtpm", SWTPM_PACKAGE)
        sock, state = str(paths.helper_socket("swtpm")), paths.tpm
        if state is None:
            raise HostError("no TPM state directory for this guest")
        for path in (sock, str(state)):
            if "," in path:             # swtpm's option syntax has no escape for commas
                raise HostError(f"swtpm cannot be given a path with a comma: {path!r}",
                                hint="choose run and data directories without commas "
                                     "(KVMRUN_RUN_DIR, KVMRUN_DATA_DIR)")
        yield HelperCommand("swtpm", [
            binary, "socket", "--tpm2", "--tpmstate", f"dir={state},mode=0600",
            "--ctrl", f"type=unixio,path={sock},mode=0600", "--log", "fd=1,level=1",
            "--terminate"], sock)


def runas_user(p: Profile, host: HostFacts) -> str | None:
    """The user QEMU drops to after opening what needs root (disks, taps, /dev/kvm,
    sockets, logs: all opened before -runas takes effect). Not with features QEMU uses
    by path after start-up (`stays_root` says which)."""
    return None if not host.qemu_user or stays_root(p) else host.qemu_user


def stays_root(p: Profile) -> str | None:
    """Why QEMU of a root kvmrun keeps root for this profile, or None: virtio-9p shares
    and a user network's TFTP directory (QEMU reads root's files by path while the guest
    runs), isolated networks (QEMU sends each frame to the hub socket, by path, in root's
    0700 run directory) and helper daemons (virtiofsd, swtpm: root's sockets; kept to root
    until a reconnect as another user is tested)."""
    if any(s.type != "virtiofs" for s in p.shares):
        return "9p shares are read by path as root"
    if p.shares:
        return "virtiofsd's socket is root's"
    if p.tpm:
        return "swtpm's socket is root's"
    if any(n.tftp for n in p.network):
        return "the TFTP directory is read by path as root"
    if any(n.type == "isolated" for n in p.network):
        return "an isolated network's hub is reached by path"
    return None


SANDBOX = {"obsolete": "deny", "elevateprivileges": "deny", "spawn": "deny",
           "resourcecontrol": "deny"}


def sandbox_option(p: Profile, host: HostFacts) -> str | None:
    """QEMU's seccomp filter (as libvirt and incus run it): no obsolete system calls, no
    set*id, no fork/exec, no CPU affinity or scheduler changes. Relaxed only where a
    feature needs it: a bridge NIC without root runs the setuid qemu-bridge-helper (a
    spawn that must keep its privileges). `sandbox: false` turns it off."""
    if not p.sandbox:
        return None
    rules = dict(SANDBOX)
    if any(n.type == "bridge" for n in p.network) and not host.net_admin:
        rules.update(spawn="allow", elevateprivileges="allow")
    if runas_user(p, host):         # -runas calls setuid after the filter is in place;
        rules.update(elevateprivileges="allow")   # once dropped, set*id cannot regain root
    return ",".join(["on"] + [f"{k}={v}" for k, v in rules.items()])


def _identity(p: Profile) -> Args:
    yield from ("-name", opts(f"guest={p.name}", process=f"kvmrun-{p.name}"))
    yield from ("-uuid", p.vm_uuid)


SHARED_RAM = "guest-ram"     # the memory backend's id when a helper maps guest RAM


def _machine(p: Profile, a: Arch, accel: str) -> Args:
    machine = p.machine or a.machine
    if accel == "tcg" and a.tcg_machine_opts and (machine == a.machine
                                                  or machine.startswith(a.machine + "-")):
        machine = f"{machine},{a.tcg_machine_opts}"
    if p.secure_boot and a.smm:
        machine = f"{machine},smm=on"
    if virtiofs_shares(p):     # vhost-user: the helper maps guest RAM, so RAM is shared memfd
        machine = f"{machine},memory-backend={SHARED_RAM}"
        yield from ("-object", opts("memory-backend-memfd", id=SHARED_RAM,
                                    size=f"{p.memory}M", share=True))
    yield from ("-machine", machine)
    thread = "multi" if accel == "tcg" and a.mttcg and p.smp > 1 else None
    yield from ("-accel", opts(accel, thread=thread))
    yield from ("-cpu", p.cpu or (a.cpu_kvm if accel == "kvm" else a.cpu_tcg))
    yield from ("-smp", str(p.smp))
    yield from ("-m", str(p.memory))
    yield from ("-nodefaults", "-no-user-config")


def _vga(a: Arch) -> str:
    return "VGA" if a.name in ("x86_64", "i386", "ppc64") else a.virtio_device("gpu")


def _display(p: Profile, a: Arch, paths: RunPaths) -> Args:
    if p.display == "none":
        yield from ("-display", "none")
    elif p.display == "vnc":
        yield from ("-display", "none", "-vnc", f"unix:{qemu_escape(paths.vnc)}")
        yield from ("-device", _vga(a))
    elif p.display == "spice":
        yield from ("-display", "none", "-spice",
                    opts("unix=on", addr=qemu_escape(paths.spice), disable_ticketing=True))
        yield from ("-device", "qxl-vga" if a.name in ("x86_64", "i386") else _vga(a))
    else:
        yield from ("-display", p.display, "-device", _vga(a))


def _firmware(p: Profile, a: Arch, host: HostFacts, paths: RunPaths,
              keep: bool | None = None) -> Args:
    if p.firmware in (None, "bios"):
        return
    if p.firmware == "uefi":
        code = (host.uefi_secure if p.secure_boot else host.uefi).get(a.name)
        if not code:
            raise HostError(f"no UEFI {'Secure Boot ' if p.secure_boot else ''}firmware "
                            f"found for {a.name}",
                            hint="install the distribution's package: ovmf (x86_64), "
                                 "qemu-efi-aarch64 (aarch64), qemu-efi-arm (arm)")
        if p.secure_boot and a.smm:       # only SMM code may write the variable store
            yield from ("-global", "driver=cfi.pflash01,property=secure,value=on")
        yield from ("-drive", opts("if=pflash", format="raw", unit=0, readonly=True,
                                   file=qemu_escape(code)))
        if paths.nvram:
            yield from ("-drive", opts("if=pflash", format="raw", unit=1,
                                       file=qemu_escape(paths.nvram),
                                       auto_read_only=keep))
        return
    yield from ("-bios", p.firmware)


def _kernel(p: Profile) -> Args:
    if not p.kernel:
        return
    yield from ("-kernel", p.kernel.path)
    if p.kernel.initrd:
        yield from ("-initrd", p.kernel.initrd)
    if p.kernel.append:
        yield from ("-append", p.kernel.append)
    if p.kernel.dtb:
        yield from ("-dtb", p.kernel.dtb)


def _seed_bus(p: Profile) -> str | None:
    """Where the cloud-init seed goes: virtio (a disk), ide or scsi (a CD-ROM)."""
    return p.cloud_init.interface if p.cloud_init else None


def _needs_scsi(p: Profile, a: Arch) -> bool:
    return (any(d.interface == "scsi" for d in p.disks) or _seed_bus(p) == "scsi"
            or (p.cdrom is not None and a.cdrom_bus == "scsi"))


def _needs_ahci(p: Profile, a: Arch) -> bool:
    """IDE disks on a machine without its own IDE bus (virt) go on an added AHCI controller."""
    return a.cdrom_bus != "ide" and (any(d.interface == "ide" for d in p.disks)
                                     or _seed_bus(p) == "ide")


def _storage(p: Profile, a: Arch, paths: RunPaths, keep: bool | None = None) -> Args:
    boot = boot_indexes(p)
    if _needs_scsi(p, a):
        yield from ("-device", opts(a.virtio_device("scsi"), id="scsi0"))
    if _needs_ahci(p, a):
        yield from ("-device", opts("ich9-ahci", id="ahci0"))
    free_ide = list(ide_slots(a, p.machine))    # enough: kvmrun.profile.rules checked

    def ide_slot() -> dict:
        bus, unit = free_ide.pop(0)
        return {"bus": bus, "unit": unit}

    for i, disk in enumerate(p.disks):
        drive = f"drive-disk{i}"
        # an ephemeral disk runs on a throwaway overlay (made by kvmrun.storage before launch)
        file, fmt = (paths.overlay(i), "qcow2") if disk.ephemeral else (disk.path, disk.format)
        yield from ("-drive", opts(file=qemu_escape(file), format=fmt,
                                   if_="none", id=drive, cache=disk.cache,
                                   readonly=disk.readonly or None,
                                   auto_read_only=None if disk.readonly else keep,
                                   werror=disk.werror, rerror=disk.rerror))
        place: dict = {}
        if disk.interface == "scsi":
            place = {"bus": "scsi0.0"}
        elif disk.interface == "ide":
            place = ide_slot()
        elif disk.interface == "sd":        # an SD card needs a host controller: one per card
            yield from ("-device", opts("sdhci-pci", id=f"sdhci{i}"))
        device = {"virtio": a.virtio_device("blk"), "ide": "ide-hd", "scsi": "scsi-hd",
                  "nvme": "nvme", "sd": "sd-card"}[disk.interface]
        bootable = i == 0 and disk.interface != "sd"     # sd-card has no bootindex
        yield from ("-device", opts(device, drive=drive, id=f"disk{i}", **place,
                                    serial=f"disk{i}" if disk.interface == "nvme" else None,
                                    bootindex=boot.get("c") if bootable else None))
    if p.cdrom:
        yield from ("-drive", opts(file=qemu_escape(p.cdrom), format="raw", if_="none",
                                   id="drive-cdrom0", media="cdrom", readonly=True))
        place = ide_slot() if a.cdrom_bus == "ide" else {"bus": "scsi0.0"}
        yield from ("-device", opts("ide-cd" if a.cdrom_bus == "ide" else "scsi-cd",
                                    drive="drive-cdrom0", id="cdrom0", **place,
                                    bootindex=boot.get("d")))
    if p.cloud_init:          # the NoCloud seed (built by kvmrun.storage.cloudinit before launch)
        yield from _seed(p, a, paths, ide_slot)


def _seed(p: Profile, a: Arch, paths: RunPaths, ide_slot) -> Args:
    """The seed, read-only: a virtio-blk disk (cloud-init finds NoCloud by its label on any
    block device, and every cloud kernel has virtio-blk), or an IDE or SCSI CD-ROM."""
    bus = _seed_bus(p)
    yield from ("-drive", opts(file=qemu_escape(paths.cidata), format="raw", if_="none",
                               id="drive-cidata", media=None if bus == "virtio" else "cdrom",
                               readonly=True))
    if bus == "virtio":
        yield from ("-device", opts(a.virtio_device("blk"), drive="drive-cidata", id="cidata"))
    else:
        place = ide_slot() if bus == "ide" else {"bus": "scsi0.0"}
        yield from ("-device", opts("ide-cd" if bus == "ide" else "scsi-cd",
                                    drive="drive-cidata", id="cidata", **place))


def _shares(p: Profile, a: Arch, paths: RunPaths) -> Args:
    for i, share in enumerate(p.shares):
        if share.type == "virtiofs":     # served by helper virtiofsd{i} (see _helpers)
            sock = paths.helper_socket(f"virtiofsd{i}")
            yield from ("-chardev", opts("socket", id=f"fs{i}", path=qemu_escape(sock)))
            yield from ("-device", opts(f"vhost-user-fs-{a.virtio}", f"chardev=fs{i}",
                                        f"tag={share.tag}", id=f"share{i}"))
            continue
        # security_model and mount_tag keep their underscores (opts() would make them dashes)
        yield from ("-fsdev", opts("local", f"id=fsdev{i}", f"path={qemu_escape(share.path)}",
                                   f"security_model={share.security_model}",
                                   readonly=share.readonly or None))
        yield from ("-device", opts(a.virtio_device("9p"), f"fsdev=fsdev{i}",
                                    f"mount_tag={share.tag}", id=f"share{i}"))


def netdev_parts(p: Profile, i: int, host: HostFacts, paths: RunPaths) -> list[str]:
    """The backend of NIC i: type, id and options (the taps, hub and NAT networks named here
    are made by kvmrun.net before launch)."""
    net, netdev = p.network[i], f"net{i}"
    if net.type == "isolated":
        return [f"dgram,id={netdev}", "local.type=unix",
                f"local.path={qemu_escape(port_socket(paths, i))}", "remote.type=unix",
                f"remote.path={qemu_escape(hub_socket(paths, net.name))}"]
    if net.type == "nat" or (net.type == "bridge" and host.net_admin):
        return [f"tap,id={netdev}", f"ifname={tap_name(p.name, i)}", "script=no",
                "downscript=no"]
    if net.type == "bridge":            # without root: QEMU's setuid qemu-bridge-helper
        return [f"bridge,id={netdev}", f"br={net.bridge}"]
    user = [f"user,id={netdev}"]
    for key in ("net", "dhcpstart"):
        if getattr(net, key):
            user.append(f"{key}={getattr(net, key)}")
    if net.restrict:
        user.append("restrict=on")
    if net.tftp:
        user.append(f"tftp={qemu_escape(net.tftp)}")
    if net.bootfile:
        user.append(f"bootfile={qemu_escape(net.bootfile)}")
    return user + [f"hostfwd={fwd}" for fwd in net.forward]


def _network(p: Profile, a: Arch, host: HostFacts, paths: RunPaths) -> Args:
    boot = boot_indexes(p)
    for i, net in enumerate(p.network):
        if net.type == "none":
            continue
        netdev = f"net{i}"
        user = netdev_parts(p, i, host, paths)
        model = net.model or a.nic
        if model == a.onboard_nic:      # built into the board: not a -device, but -nic
            yield from ("-nic", opts(*user, model=model, mac=net.mac or stable_mac(p.name, i)))
            continue
        yield from ("-netdev", ",".join(user))
        yield from ("-device", opts(model, netdev=netdev, id=f"nic{i}",
                                    mac=net.mac or stable_mac(p.name, i),
                                    bootindex=boot.get("n") if i == 0 else None))


def _serial(p: Profile, paths: RunPaths) -> Args:
    if p.serial == "none":
        return
    if p.serial == "stdio":
        yield from ("-chardev", "stdio,id=serial0,signal=off")
    else:
        log = paths.serial_log if p.serial == "log" else None
        yield from ("-chardev", opts("socket", id="serial0",
                                     path=qemu_escape(paths.console), server=True,
                                     wait=False,
                                     logfile=qemu_escape(log) if log else None,
                                     logappend=True if log else None))
    yield from ("-serial", "chardev:serial0")


def _devices(p: Profile, a: Arch, paths: RunPaths) -> Args:
    wanted = set(p.devices)
    if p.shutdown.method == "agent":
        wanted.add("agent")
    if "rng" in wanted:
        yield from ("-device", opts(a.virtio_device("rng"), id="rng0"))
    if "balloon" in wanted:
        yield from ("-device", opts(a.virtio_device("balloon"), id="balloon0"))
    if "agent" in wanted:
        yield from ("-device", opts(a.virtio_device("serial"), id="vserial0"))
        yield from ("-chardev", opts("socket", id="qga0", path=qemu_escape(paths.qga),
                                     server=True, wait=False))
        yield from ("-device", opts("virtserialport", bus="vserial0.0", chardev="qga0",
                                    name=AGENT_PORT))
    if "tablet" in wanted:
        yield from ("-device", "qemu-xhci,id=usb0", "-device", "usb-tablet,bus=usb0.0")
    if p.tpm:                          # swtpm, helper "swtpm" (see _helpers)
        yield from ("-chardev", opts("socket", id="tpm-chr",
                                     path=qemu_escape(paths.helper_socket("swtpm"))))
        yield from ("-tpmdev", "emulator,id=tpm0,chardev=tpm-chr")
        yield from ("-device", opts(a.tpm, tpmdev="tpm0", id="tpm0"))


def _control(p: Profile, paths: RunPaths) -> Args:
    for chardev, sock in (("qmp", paths.qmp), ("qmp-cli", paths.qmp_cli)):
        yield from ("-chardev", opts("socket", id=chardev, path=qemu_escape(sock),
                                     server=True, wait=False))
        yield from ("-mon", opts(chardev=chardev, mode="control"))
    yield from ("-pidfile", str(paths.pidfile))
    if p.gdb == "unix":           # only this user can enter the run directory
        yield from ("-chardev", opts("socket", id="gdb0", path=qemu_escape(paths.gdb),
                                     server=True, wait=False))
        yield from ("-gdb", "chardev:gdb0")
    elif p.gdb:
        yield from ("-gdb", f"tcp:{p.gdb}")
    if p.halted:
        yield "-S"
    if p.semihosting:
        yield from ("-semihosting-config", "enable=on,target=native")
