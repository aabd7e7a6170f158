"""The architecture table: data, not `if` chains.

Each guest architecture says which QEMU binary runs it (and the Debian package that has it),
its default machine and CPU models, its serial console name inside a Linux guest, how virtio
devices attach (PCI, MMIO or CCW), its NIC model, where a CD-ROM goes, what firmware runs
without `firmware:` and its UEFI images, which machines have a power button QEMU's
`system_powerdown` presses, and whether KVM can apply on a host.

Boards that differ from their architecture's defaults (no PCI bus, an on-board NIC) are
`Board` rows; `for_machine(arch, machine)` gives the architecture with a board's differences
applied, which is what the compiler uses. Every default here was checked by starting the
installed QEMU 7.2 paused (`tests/integration/test_oracle.py` keeps checking it).
"""

from __future__ import annotations

import fnmatch
import os

from kvmrun import records
from kvmrun.errors import HostError
from kvmrun.records import field, record


@record(frozen=True)
class Board:
    """A machine type whose hardware differs from its architecture's default machine."""

    name: str
    virtio: str | None = "pci"        # "pci" | "device" (virtio-mmio slots) | None: no virtio
    nic: str | None = None            # on-board NIC model (compiled as -nic), None: none
    cpu: str | None = None            # CPU model, if the board fixes one
    console: str | None = None        # kernel console name, if not the architecture's
    note: str = ""                    # shown in validation errors


@record(frozen=True)
class Arch:
    name: str
    qemu: str                         # binary name
    machine: str                      # default machine type
    cpu_tcg: str                      # default CPU model under TCG
    cpu_kvm: str                      # default CPU model under KVM
    console: str                      # kernel console device (console=…)
    virtio: str | None                # device suffix: "pci" | "ccw" | "device" (MMIO) | None
    nic: str                          # default NIC model
    cdrom_bus: str                    # "ide" | "scsi"
    kvm_hosts: tuple[str, ...]        # host `uname -m` values on which KVM can run this guest
    package: str = "qemu-system-misc"  # Debian package with the QEMU binary
    firmware: str = ""                # what runs without `firmware:` (QEMU's default)
    mttcg: bool = True                # multi-threaded TCG supported (-accel tcg,thread=multi)
    # machines (fnmatch patterns) where `system_powerdown` reaches the guest: an ACPI power
    # button (x86 and aarch64 with UEFI), the GPIO power key (Arm virt, device tree),
    # an EPOW event (pseries) or an SCLP quiesce signal (s390x)
    power_button: tuple[str, ...] = ()
    tcg_machine_opts: str = ""        # machine options the default machine needs under TCG
    semihosting: bool = False         # QEMU offers -semihosting-config for this target
    uefi_code: tuple[str, ...] = ()   # candidate firmware code images (first found wins)
    uefi_vars: tuple[str, ...] = ()   # matching variable-store templates
    # Secure Boot: (code, variable store with Microsoft's keys enrolled) pairs, first pair
    # found wins; `smm`: the code keeps its variables safe in SMM (x86), so QEMU needs
    # smm=on and a secure pflash
    uefi_secure: tuple[tuple[str, str], ...] = ()
    smm: bool = False
    onboard_nic: str | None = None    # a NIC built into the machine: `-nic user,model=…`
    tpm: str | None = None            # the TPM 2.0 device model (`tpm: true`); None: none
    boards: tuple[Board, ...] = ()
    aliases: tuple[str, ...] = ()

    def kvm_possible(self, host_machine: str) -> bool:
        return host_machine in self.kvm_hosts

    def virtio_device(self, kind: str) -> str:
        """virtio_device('blk') -> 'virtio-blk-pci' (or -ccw / -device)."""
        if self.virtio is None:
            raise HostError(f"the {self.machine} machine has no virtio transport "
                            f"(no PCI bus, no virtio-mmio slots)")
        return f"virtio-{kind}-{self.virtio}"

    def has_power_button(self, machine: str | None = None) -> bool:
        """Whether QEMU's system_powerdown reaches a guest of this machine type."""
        machine = machine or self.machine
        return any(fnmatch.fnmatchcase(machine, pat) for pat in self.power_button)

    def board(self, machine: str | None) -> Board | None:
        return next((b for b in self.boards if b.name == (machine or self.machine)), None)


AAVMF = "/usr/share/AAVMF"
EDK2 = "/usr/share/edk2"

ARCHES: dict[str, Arch] = {a.name: a for a in (
    Arch("x86_64", "qemu-system-x86_64", "q35", "max", "host", "ttyS0", "pci", "virtio-net-pci",
         "ide", ("x86_64",), package="qemu-system-x86", firmware="SeaBIOS",
         power_button=("q35", "pc", "pc-*", "microvm"),
         uefi_code=("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd",
                    f"{EDK2}/ovmf/OVMF_CODE.fd"),
         uefi_vars=("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd",
                    f"{EDK2}/ovmf/OVMF_VARS.fd"),
         uefi_secure=(("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
                       "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
                      ("/usr/share/OVMF/OVMF_CODE.secboot.fd", "/usr/share/OVMF/OVMF_VARS.ms.fd"),
                      (f"{EDK2}/ovmf/OVMF_CODE.secboot.fd", f"{EDK2}/ovmf/OVMF_VARS.secboot.fd")),
         smm=True, tpm="tpm-crb", aliases=("amd64", "x64")),
    Arch("i386", "qemu-system-i386", "q35", "max", "host", "ttyS0", "pci", "virtio-net-pci",
         "ide", ("x86_64", "i686", "i386"), package="qemu-system-x86", firmware="SeaBIOS",
         power_button=("q35", "pc", "pc-*"), tpm="tpm-crb", aliases=("i686", "x86")),
    # UEFI code and variables are 64 MiB pflash images (virt refuses other sizes), so
    # qemu-efi-aarch64's 2 MiB QEMU_EFI.fd (a -bios image) is no candidate
    Arch("aarch64", "qemu-system-aarch64", "virt", "max", "host", "ttyAMA0", "pci",
         "virtio-net-pci", "scsi", ("aarch64",), package="qemu-system-arm",
         firmware="none: a kernel, or firmware: uefi (AAVMF)",
         power_button=("virt", "virt-*"),
         uefi_code=(f"{AAVMF}/AAVMF_CODE.fd", f"{EDK2}/aarch64/QEMU_EFI-pflash.raw"),
         uefi_vars=(f"{AAVMF}/AAVMF_VARS.fd", f"{EDK2}/aarch64/vars-template-pflash.raw"),
         uefi_secure=((f"{AAVMF}/AAVMF_CODE.ms.fd", f"{AAVMF}/AAVMF_VARS.ms.fd"),),
         semihosting=True, tpm="tpm-tis-device", aliases=("arm64",)),
    Arch("arm", "qemu-system-arm", "virt", "max", "host", "ttyAMA0", "pci", "virtio-net-pci",
         "scsi", ("armv7l", "armv8l"), package="qemu-system-arm",
         firmware="none: a kernel, or firmware: uefi (AAVMF32)",
         power_button=("virt", "virt-*"),
         uefi_code=(f"{AAVMF}/AAVMF32_CODE.fd", f"{EDK2}/arm/QEMU_EFI-pflash.raw"),
         uefi_vars=(f"{AAVMF}/AAVMF32_VARS.fd", f"{EDK2}/arm/vars-template-pflash.raw"),
         semihosting=True, tpm="tpm-tis-device", aliases=("armhf", "armv7", "armv7l"),
         # Versatile Express: no PCI, but QEMU adds four virtio-mmio slots to the device
         # tree it is given; the SMSC LAN9118 is on the board
         boards=(Board("vexpress-a9", virtio="device", nic="lan9118", cpu="cortex-a9",
                       note="Versatile Express has no PCI bus"),
                 Board("vexpress-a15", virtio="device", nic="lan9118", cpu="cortex-a15",
                       note="Versatile Express has no PCI bus"))),
    # OpenSBI (QEMU's own copy) runs first; a kernel or U-Boot (kernel: uboot.elf) runs in
    # S-mode after it. The virt machine of QEMU 7.2 has no power button.
    Arch("riscv64", "qemu-system-riscv64", "virt", "rv64", "host", "ttyS0", "pci",
         "virtio-net-pci", "scsi", ("riscv64",), firmware="OpenSBI (fw_dynamic)",
         semihosting=True),
    Arch("riscv32", "qemu-system-riscv32", "virt", "rv32", "host", "ttyS0", "pci",
         "virtio-net-pci", "scsi", (), firmware="OpenSBI (fw_dynamic)", semihosting=True),
    # Under TCG, pseries asks for Spectre mitigations TCG lacks and warns about each one
    Arch("ppc64", "qemu-system-ppc64", "pseries", "power9", "host", "hvc0", "pci",
         "virtio-net-pci", "scsi", ("ppc64", "ppc64le"), package="qemu-system-ppc",
         firmware="SLOF", power_button=("pseries", "pseries-*"),
         tcg_machine_opts="cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
                          "cap-ccf-assist=off",
         aliases=("ppc64le",)),
    Arch("s390x", "qemu-system-s390x", "s390-ccw-virtio", "max", "host", "ttysclp0", "ccw",
         "virtio-net-ccw", "scsi", ("s390x",), firmware="s390-ccw.img",
         power_button=("s390-ccw-virtio", "s390-ccw-virtio-*")),
)}

_ALIASES = {alias: a.name for a in ARCHES.values() for alias in a.aliases}


def canonical(name: str) -> str | None:
    """The table's name for an architecture or one of its aliases, else None."""
    return name if name in ARCHES else _ALIASES.get(name)


def get(name: str) -> Arch:
    found = canonical(name)
    if found is None:
        raise HostError(f"unknown architecture {name!r}",
                        hint="known: " + ", ".join(ARCHES))
    return ARCHES[found]


def for_machine(name: str, machine: str | None = None) -> Arch:
    """The architecture as a guest of `machine` sees it: a board's differences applied."""
    a = get(name)
    board = a.board(machine)
    if board is None:
        return a
    return records.replace(a, virtio=board.virtio, nic=board.nic or a.nic,
                           onboard_nic=board.nic, console=board.console or a.console,
                           cpu_tcg=board.cpu or a.cpu_tcg, cpu_kvm=board.cpu or a.cpu_kvm)


def host_machine() -> str:
    """The host's `uname -m`, e.g. x86_64."""
    return os.uname().machine            # as platform.machine(), without its import (~2 ms)


def host_arch() -> str:
    """The table name of the host architecture (default guest arch)."""
    return canonical(host_machine()) or host_machine()


@record(frozen=True)
class HostFacts:
    """What the compiler needs to know about the host: probed once by kvmrun.qemu.host,
    pinned in tests."""

    machine: str = "x86_64"                     # `uname -m`
    kvm: bool = False                           # /dev/kvm usable and guests boot under it
    forced_accel: str | None = None             # KVMRUN_ACCEL
    net_admin: bool = False                     # root: kvmrun makes taps for bridged NICs
    qemu_user: str | None = None                # root: QEMU drops to this user (-runas)
    run_with: bool = False                      # QEMU >= 9.1: -run-with user= for -runas
    uefi: dict[str, str] = field(default_factory=dict)   # arch -> firmware code image
    uefi_secure: dict[str, str] = field(default_factory=dict)   # arch -> Secure Boot code
    virtiofsd: str | None = None                # the virtiofsd binary (virtiofs shares)
    swtpm: str | None = None                    # the swtpm binary (tpm: true)


# IDE slots (bus, unit) in the order kvmrun fills them. QEMU puts every IDE device given
# without `bus=` on the first IDE bus, which holds one unit on q35's AHCI and two on the PC's
# IDE, so `-hda` plus a CD-ROM fails on q35 unless each device is placed.
PIIX_IDE = (("ide.0", 0), ("ide.0", 1), ("ide.1", 0), ("ide.1", 1))   # pc, isapc: 2 x 2
Q35_IDE = tuple((f"ide.{n}", None) for n in range(6))                 # q35: 6 AHCI ports
OWN_AHCI = tuple((f"ahci0.{n}", None) for n in range(6))              # the ich9-ahci added


def ide_slots(a: Arch, machine: str | None) -> tuple[tuple[str, int | None], ...]:
    """The IDE slots of a machine: its own IDE or AHCI bus, else the AHCI kvmrun adds."""
    if a.cdrom_bus != "ide":
        return OWN_AHCI
    machine = machine or a.machine
    piix = machine in ("pc", "isapc") or machine.startswith("pc-i440fx")
    return PIIX_IDE if piix else Q35_IDE
