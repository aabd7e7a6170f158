"""The architecture table: data, not `if` chains.

Each guest architecture says which QEMU binary runs it, its default machine and CPU models,
its serial console name inside a Linux guest, how virtio devices attach (PCI, MMIO or CCW),
its NIC model, where a CD-ROM goes, its UEFI firmware and whether KVM can apply on a host.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from kvmrun.errors import HostError


@dataclass(frozen=True)
class Arch:
    name: str
    qemu: str                         # binary name
    machine: str                      # default machine type
    cpu_tcg: str                      # default CPU model under TCG
    cpu_kvm: str                      # default CPU model under KVM
    console: str                      # kernel console device (console=…)
    virtio: str                       # device suffix: "pci" | "ccw" | "device" (MMIO)
    nic: str                          # default NIC model
    cdrom_bus: str                    # "ide" | "scsi"
    kvm_hosts: tuple[str, ...]        # host `uname -m` values on which KVM can run this guest
    mttcg: bool = True                # multi-threaded TCG supported
    acpi: bool = False                # default machine has ACPI power button
    semihosting: bool = False         # QEMU offers -semihosting-config for this target
    uefi_code: tuple[str, ...] = ()   # candidate firmware code images (first found wins)
    uefi_vars: tuple[str, ...] = ()   # matching variable-store templates
    aliases: tuple[str, ...] = ()

    def kvm_possible(self, host_machine: str) -> bool:
        return host_machine in self.kvm_hosts

    def virtio_device(self, kind: str) -> str:
        """virtio_device('blk') -> 'virtio-blk-pci' (or -ccw / -device)."""
        return f"virtio-{kind}-{self.virtio}"


ARCHES: dict[str, Arch] = {a.name: a for a in (
    Arch("x86_64", "qemu-system-x86_64", "q35", "max", "host", "ttyS0", "pci", "virtio-net-pci",
         "ide", ("x86_64",), acpi=True,
         uefi_code=("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd",
                    "/usr/share/edk2/ovmf/OVMF_CODE.fd"),
         uefi_vars=("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd",
                    "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
         aliases=("amd64", "x64")),
    Arch("i386", "qemu-system-i386", "q35", "max", "host", "ttyS0", "pci", "virtio-net-pci",
         "ide", ("x86_64", "i686", "i386"), acpi=True, aliases=("i686", "x86")),
    Arch("aarch64", "qemu-system-aarch64", "virt", "max", "host", "ttyAMA0", "pci",
         "virtio-net-pci", "scsi", ("aarch64",),
         uefi_code=("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"),
         uefi_vars=("/usr/share/AAVMF/AAVMF_VARS.fd",),
         semihosting=True, aliases=("arm64",)),
    Arch("arm", "qemu-system-arm", "virt", "max", "host", "ttyAMA0", "pci", "virtio-net-pci",
         "scsi", ("armv7l", "armv8l"),
         uefi_code=("/usr/share/AAVMF/AAVMF32_CODE.fd",),
         uefi_vars=("/usr/share/AAVMF/AAVMF32_VARS.fd",),
         semihosting=True, aliases=("armhf", "armv7", "armv7l")),
    Arch("riscv64", "qemu-system-riscv64", "virt", "rv64", "host", "ttyS0", "pci",
         "virtio-net-pci", "scsi", ("riscv64",), semihosting=True),
    Arch("riscv32", "qemu-system-riscv32", "virt", "rv32", "host", "ttyS0", "pci",
         "virtio-net-pci", "scsi", (), semihosting=True),
    Arch("ppc64", "qemu-system-ppc64", "pseries", "power9", "host", "hvc0", "pci",
         "virtio-net-pci", "scsi", ("ppc64", "ppc64le"), aliases=("ppc64le",)),
    Arch("s390x", "qemu-system-s390x", "s390-ccw-virtio", "max", "host", "ttysclp0", "ccw",
         "virtio-net-ccw", "scsi", ("s390x",)),
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


def host_machine() -> str:
    """The host's `uname -m`, e.g. x86_64."""
    return platform.machine()


def host_arch() -> str:
    """The table name of the host architecture (default guest arch)."""
    return canonical(host_machine()) or host_machine()
