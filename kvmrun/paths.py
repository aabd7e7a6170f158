"""Where things live: per-user directories and a guest's run-directory layout.

Every directory can be moved with an environment variable, so tests isolate themselves:
KVMRUN_RUN_DIR, KVMRUN_CONFIG_DIR, KVMRUN_DATA_DIR, KVMRUN_CACHE_DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

import re

from kvmrun.errors import HostError, InvalidName

HELPER_PREFIX = "helper-"   # run-directory files of the guest's helpers (virtiofsd, swtpm)
UNIX_PATH_MAX = 107          # sun_path is 108 bytes including the terminating NUL
# The one name rule: VM names (run-directory names), network names, pool names
NAME_RE = r"[A-Za-z0-9]+([._-][A-Za-z0-9]+)*"
MAX_NAME = 64
NAME_RULE = f"letters, digits and . _ - between them, at most {MAX_NAME} characters"


def valid_name(name: str, max_len: int = MAX_NAME) -> bool:
    return isinstance(name, str) and len(name) <= max_len and bool(re.fullmatch(NAME_RE, name))


def check_name(name: str, what: str = "VM name") -> str:
    """Every VM name that enters kvmrun (a profile, --name, a NAME argument) passes here:
    a name with a comma or a slash would reach QEMU's -name or leave the run directory."""
    if not valid_name(name):
        raise InvalidName(f"{name!r} is not a valid {what} ({NAME_RULE})")
    return name


def _root() -> bool:
    return os.geteuid() == 0


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def run_dir() -> Path:
    if os.environ.get("KVMRUN_RUN_DIR"):
        return Path(os.environ["KVMRUN_RUN_DIR"])
    if _root():
        return Path("/run/kvmrun")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "kvmrun" if runtime else Path(f"/tmp/kvmrun-{os.getuid()}")


def config_dir() -> Path:
    if os.environ.get("KVMRUN_CONFIG_DIR"):
        return Path(os.environ["KVMRUN_CONFIG_DIR"])
    return Path("/etc/kvmrun") if _root() else _xdg("XDG_CONFIG_HOME", ".config") / "kvmrun"


def data_dir() -> Path:
    if os.environ.get("KVMRUN_DATA_DIR"):
        return Path(os.environ["KVMRUN_DATA_DIR"])
    return Path("/var/lib/kvmrun") if _root() else _xdg("XDG_DATA_HOME", ".local/share") / "kvmrun"


def cache_dir() -> Path:
    if os.environ.get("KVMRUN_CACHE_DIR"):
        return Path(os.environ["KVMRUN_CACHE_DIR"])
    return Path("/var/cache/kvmrun") if _root() else _xdg("XDG_CACHE_HOME", ".cache") / "kvmrun"


def vm_dir() -> Path:
    """Where defined VMs live: <config dir>/vms/NAME.yaml (kvmrun.ops.defined)."""
    return config_dir() / "vms"


def defined_path(name: str) -> Path:
    return vm_dir() / f"{name}.yaml"


def autostart_path(name: str) -> Path:
    """The mark of a defined VM that starts at boot (`kvmrun autostart NAME`): a link to its
    file in vms/, kept beside the profile rather than in it, as libvirt keeps autostart/."""
    return config_dir() / "autostart" / f"{name}.yaml"


def is_defined(name: str) -> bool:
    return valid_name(name) and defined_path(name).is_file()


def profile_file(ref: str) -> Path | None:
    """The file a PROFILE argument names: a reference containing '/' or ending in
    .yaml/.yml is always a file path; a bare word is the defined VM of that name if there is
    one, else a file of that name in the current directory (write `./web` to mean the file
    when a VM `web` is defined). None: a bare word that names neither."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or "/" in ref:
        return path
    if is_defined(ref):
        return defined_path(ref)
    return path if path.is_file() else None


def nvram_path(name: str) -> Path:
    """The VM's own copy of the UEFI variable store, kept across restarts."""
    return data_dir() / "nvram" / f"{name}_VARS.fd"


def resume_path(name: str) -> Path:
    """The snapshot whose RAM state the VM's next start loads (kvmrun.ops.snapshots)."""
    return data_dir() / "resume" / f"{name}.json"
def tpm_state_dir(name: str) -> Path:
    """The VM's TPM 2.0 state (swtpm's --tpmstate directory), kept across restarts."""
    return data_dir() / "tpm" / name


class RunPaths:
    """The files of one guest's run directory. Immutable; a plain class rather than a
    dataclass, which would bring inspect, ast and dis into every supervisor (~1.4 MiB)."""

    __slots__ = ("dir", "nvram", "tpm")

    def __init__(self, dir: Path, nvram: Path | None = None, tpm: Path | None = None):
        object.__setattr__(self, "dir", dir)
        object.__setattr__(self, "nvram", nvram)
        object.__setattr__(self, "tpm", tpm)          # the TPM state directory (tpm: true)

    def __setattr__(self, name, value):
        raise AttributeError(f"RunPaths is immutable (cannot set {name})")

    def __eq__(self, other) -> bool:
        return ((self.dir, self.nvram, self.tpm) == (other.dir, other.nvram, other.tpm)
                if type(other) is RunPaths else NotImplemented)

    def __hash__(self) -> int:
        return hash((self.dir, self.nvram, self.tpm))

    def __repr__(self) -> str:
        return f"RunPaths(dir={self.dir!r}, nvram={self.nvram!r}, tpm={self.tpm!r})"

    @classmethod
    def for_guest(cls, name: str, base: Path | None = None) -> "RunPaths":
        check_name(name)
        return cls((base or run_dir()) / name, nvram_path(name), tpm_state_dir(name))

    def _p(self, leaf: str) -> Path:
        return self.dir / leaf

    launch = property(lambda self: self._p("launch.json"))    # what the supervisor runs
    request = property(lambda self: self._p("request.json"))  # what a CLI asked for
    monitor_hold = property(lambda self: self._p("monitor.json"))  # a CLI holding qmp-cli
    network = property(lambda self: self._p("network.json"))  # what setup made for the NICs
    qemu_log = property(lambda self: self._p("qemu.log"))
    supervisor_log = property(lambda self: self._p("supervisor.log"))
    supervisor_log_old = property(lambda self: self._p("supervisor.log.1"))  # a start back
    qmp = property(lambda self: self._p("qmp.sock"))          # the supervisor's monitor
    qmp_cli = property(lambda self: self._p("qmp-cli.sock"))  # the CLI's monitor
    console = property(lambda self: self._p("console.sock"))
    serial_log = property(lambda self: self._p("serial.log"))
    serial_log_old = property(lambda self: self._p("serial.log.1"))   # rotated away
    qga = property(lambda self: self._p("qga.sock"))
    gdb = property(lambda self: self._p("gdb.sock"))          # the gdb stub (gdb: true)
    vnc = property(lambda self: self._p("vnc.sock"))
    spice = property(lambda self: self._p("spice.sock"))
    pidfile = property(lambda self: self._p("qemu.pid"))
    state = property(lambda self: self._p("state.json"))
    events = property(lambda self: self._p("events.jsonl"))
    lock = property(lambda self: self._p("lock"))
    cidata = property(lambda self: self._p("cidata.iso"))     # the cloud-init NoCloud seed
    cidata_stamp = property(lambda self: self._p("cidata.sha256"))
    # a live migration (kvmrun.ops.migrate): its record on both sides, the target's sockets
    # (migration stream, NBD) and the source's ends of their ssh forwards
    migration = property(lambda self: self._p("migration.json"))
    migrate_sock = property(lambda self: self._p("migrate.sock"))
    nbd_sock = property(lambda self: self._p("nbd.sock"))
    migrate_out = property(lambda self: self._p("migrate-out.sock"))
    nbd_out = property(lambda self: self._p("nbd-out.sock"))

    def port_socket(self, index: int) -> Path:
        """The unix datagram socket QEMU binds for NIC `index` on an isolated network."""
        return self._p(f"net{index}.sock")

    def overlay(self, index: int) -> Path:
        """The throwaway qcow2 overlay of an ephemeral disk (deleted when the guest ends)."""
        return self._p(f"overlay-disk{index}.qcow2")

    def helper_socket(self, name: str) -> Path:
        """The socket helper `name` (virtiofsd0, swtpm: kvmrun.guest.helpers) listens on."""
        return self._p(f"{HELPER_PREFIX}{name}.sock")

    def helper_log(self, name: str) -> Path:
        """Helper `name`'s stdout and stderr."""
        return self._p(f"{HELPER_PREFIX}{name}.log")

    def helper_files(self, suffix: str) -> list[Path]:
        """The helpers' sockets (".sock") or logs (".log") in the run directory."""
        return sorted(self.dir.glob(f"{HELPER_PREFIX}*{suffix}"))

    def sockets(self) -> list[Path]:
        return [self.qmp, self.qmp_cli, self.console, self.qga, self.vnc, self.spice,
                self.gdb, self.migrate_sock, self.nbd_sock, self.migrate_out, self.nbd_out]

    def check_length(self, extra: list[Path] = ()) -> None:
        """Every socket path fits a unix socket address (`extra`: the helpers' sockets)."""
        longest = max([*self.sockets(), *extra], key=lambda p: len(os.fsencode(p)))
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            raise HostError(
                f"socket path {str(longest)!r} is {len(os.fsencode(longest))} bytes; unix "
                f"sockets allow {UNIX_PATH_MAX}",
                hint="use a shorter VM name or a shorter run directory (--run-dir or "
                     "KVMRUN_RUN_DIR)")
