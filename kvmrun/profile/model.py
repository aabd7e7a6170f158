"""The typed profile: immutable records (kvmrun.records), one per section of a profile.

Built by `kvmrun.profile.load` from the key tables in `kvmrun.profile.keys`; read by the
compiler and the operations. A field's default here is the profile's default.
"""

from __future__ import annotations


from kvmrun import arch as archmod
from kvmrun.errors import Location
from kvmrun.profile.yamlsrc import KeyPath
from kvmrun.records import field, record

# The line cloud-init's final stage prints on the console (cloud_final_modules, final_message)
CLOUD_INIT_FINISHED = r"Cloud-init v\. \S+ finished at"


@record(frozen=True)
class Kernel:
    path: str
    initrd: str | None = None
    append: str | None = None
    dtb: str | None = None


@record(frozen=True)
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
    volume: str | None = None        # … and the volume in it: the path is resolved by kvmrun.storage.disks.resolve_pools
    werror: str | None = None        # on a write error: QEMU's -drive werror (default enospc)
    rerror: str | None = None        # on a read error: QEMU's -drive rerror (default report)


@record(frozen=True)
class Share:
    path: str
    tag: str
    readonly: bool = False
    security_model: str = "none"     # 9p only
    type: str = "9p"                 # 9p (QEMU serves it) or virtiofs (a virtiofsd helper)


def is_key_file(key: str) -> bool:
    """A cloud_init.ssh_authorized_keys entry that names a .pub file rather than a key."""
    key = key.strip()
    return key.endswith(".pub") and "\n" not in key and " " not in key


@record(frozen=True)
class CloudInit:
    user_data: str | None = None
    user_data_file: str | None = None
    meta_data: str | None = None
    network_config: str | None = None
    hostname: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()     # keys, or .pub files (absolute paths)
    password: str | None = None
    interface: str = "virtio"        # the seed's bus: virtio (read-only disk), ide, scsi (CD)


@record(frozen=True)
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


@record(frozen=True)
class Shutdown:
    timeout: int = 60
    method: str = "acpi"
    command: str = "poweroff"


@record(frozen=True)
class Ready:
    console: str | None = None
    timeout: int = 300
    cloud_init: bool = False         # ready when cloud-init prints its final line

    @property
    def pattern(self) -> str | None:
        """The console pattern the supervisor waits for (console, or cloud-init's last line)."""
        return self.console or (CLOUD_INIT_FINISHED if self.cloud_init else None)


@record(frozen=True)
class Ssh:
    user: str | None = None          # `kvmrun ssh` login name
    identity: str | None = None      # private key; default: a .pub key's private half


@record(frozen=True)
class Limits:
    """Resource limits of the guest's QEMU, through its own cgroup v2 leaf."""
    cpu_weight: int | None = None    # cpu.weight, 1-10000 (the kernel's default is 100)
    cpu_max: int | None = None       # percent of one CPU (cpu.max; systemd's CPUQuota)
    memory_max: int | None = None    # MiB (memory.max), for QEMU as a whole
    io_weight: int | None = None     # io.weight, 1-10000 (default 100)

    def asked(self) -> dict:
        """The limits set, by name."""
        return {k: v for k, v in vars(self).items() if v is not None}


@record(frozen=True)
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
    firmware: str | None = None            # bios, uefi or a file (uefi-secure is loaded
    secure_boot: bool = False              # as firmware uefi with secure_boot true)
    disks: tuple[Disk, ...] = ()
    cdrom: str | None = None
    shares: tuple[Share, ...] = ()
    cloud_init: CloudInit | None = None
    network: tuple[Network, ...] = (Network(),)
    display: str = "none"
    serial: str = "log"
    serial_log_max: int = 8                # MiB; serial.log is rotated at this size
    devices: tuple[str, ...] = ("rng",)
    shutdown: Shutdown = Shutdown()
    ready: Ready = Ready()
    ssh: Ssh = Ssh()
    gdb: str | None = None
    halted: bool = False
    semihosting: bool = False
    sandbox: bool = True                   # QEMU's seccomp sandbox (-sandbox on,…)
    tpm: bool = False                      # a TPM 2.0: a swtpm helper, state in the data dir
    limits: Limits = Limits()              # cgroup v2 limits (kvmrun.qemu.cgroup)
    qemu_args: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)
    lines: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def vm_uuid(self) -> str:
        """The profile's uuid, else one derived from the name (stable across hosts)."""
        return self.uuid or name_uuid(f"kvmrun:{self.name}")

    def location(self, *path: str | int) -> Location:
        probe: KeyPath = tuple(path)
        while probe not in self.lines and probe:
            probe = probe[:-1]
        file, line = self.lines.get(probe, (self.source or "<profile>", None))
        return Location(file, tuple(path), line)


URL_NAMESPACE = bytes.fromhex("6ba7b8119dad11d180b400c04fd430c8")     # uuid.NAMESPACE_URL


def name_uuid(name: str) -> str:
    """`str(uuid.uuid5(uuid.NAMESPACE_URL, name))` (RFC 4122's SHA-1 name-based UUID) without
    the uuid module, which imports platform: ~3 ms of every start of a changed profile
    (tests/unit/test_model pins it against uuid)."""
    try:
        from _sha1 import sha1          # CPython's own: hashlib's loads OpenSSL (~4 ms)
    except ImportError:
        from hashlib import sha1
    b = bytearray(sha1(URL_NAMESPACE + name.encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50                     # version 5
    b[8] = (b[8] & 0x3F) | 0x80                     # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
