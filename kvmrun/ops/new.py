"""`kvmrun new`: a profile with good defaults for an operating system and an install mode.

`new_profile(...)` is pure: it reads osinfo-db (through kvmrun.ops.osinfo) and returns a
profile mapping that `kvmrun.profile.from_mapping` accepted; the CLI and the web UI's New VM
form both call it, then define the result. Defaults, as virt-install chooses them:

- memory, vCPUs and disk size: the OS's recommendation, at least its minimum (osinfo-db);
  without `--os` 1 GiB, 1 vCPU, 20 GiB;
- virtio disks and NIC when the OS supports them, else SATA (`ide` on q35's AHCI) and the
  NIC it knows (e1000e, e1000 or rtl8139);
- UEFI when the OS refuses BIOS (Windows 11), or with `uefi=True`;
- a graphical display (VNC, with a USB tablet) for CD-ROM and network installs, the serial
  console otherwise;
- a new qcow2 disk, made on first start: in a pool (`pool`) or under
  `$KVMRUN_DATA_DIR/images/NAME.qcow2`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvmrun import paths
from kvmrun.errors import Location, ProfileError
from kvmrun.ops import defined, launch, osinfo
from kvmrun.profile import Profile, from_mapping
from kvmrun.qemu import checks

MODES = ("cdrom", "kernel", "import", "pxe", "none")
DEFAULT_MEMORY_MIB = 1024
DEFAULT_CPUS = 1
DEFAULT_DISK_GIB = 20
SIZE_RE = re.compile(r"\d+(\.\d+)?\s*[KMGT]i?B?", re.IGNORECASE)
NET_TYPES = ("user", "isolated", "nat", "bridge", "none")
WHERE = "kvmrun new"


def _error(key: tuple, message: str, hint: str | None = None) -> ProfileError:
    return ProfileError(Location(WHERE, key), message, hint)


def images_dir() -> Path:
    """Where new disks without a pool go."""
    return paths.data_dir() / "images"


def suggested(entry=None) -> dict:
    """Memory (MiB), vCPUs and disk (GiB) for an osinfo entry (or kvmrun's defaults)."""
    def pick(attr: str, fallback: int) -> int:
        if entry is None:
            return fallback
        rec, low = getattr(entry.recommended, attr), getattr(entry.minimum, attr)
        return max(v for v in (rec, low, 0) if v is not None) or fallback
    return {"memory_mib": pick("ram_mib", DEFAULT_MEMORY_MIB),
            "cpus": pick("cpus", DEFAULT_CPUS),
            "disk_gib": pick("storage_gib", DEFAULT_DISK_GIB)}


def install_mode(cdrom=None, kernel=None, import_disk=None, pxe=False) -> str:
    """The one install mode the given sources name ("none" for a blank VM)."""
    given = [m for m, v in (("cdrom", cdrom), ("kernel", kernel), ("import", import_disk),
                            ("pxe", pxe)) if v]
    if len(given) > 1:
        raise _error(("install",), f"choose one install mode, not {' and '.join(given)}",
                     hint="--cdrom ISO, --kernel K [--initrd I], --import DISK or --pxe")
    return given[0] if given else "none"


def parse_network(spec: str | None, nic_model: str | None = None) -> list[dict]:
    """`user`, `none`, `isolated:NAME`, `nat[:NAME]` or `bridge:BR` -> profile NICs."""
    spec = (spec or "user").strip()
    kind, _, arg = spec.partition(":")
    if kind not in NET_TYPES:
        raise _error(("network",), f"network {spec!r}: unknown type {kind!r}",
                     hint="user, none, isolated:NAME, nat[:NAME] or bridge:BRIDGE")
    if kind == "none":
        return []
    nic: dict = {"type": kind}
    if kind in ("isolated", "bridge") and not arg:
        raise _error(("network",), f"network {spec!r} needs a name: {kind}:NAME")
    if arg:
        if kind == "user":
            raise _error(("network",), "a user network takes no name")
        nic["bridge" if kind == "bridge" else "name"] = arg
    if nic_model and nic_model != "virtio-net":
        nic["model"] = nic_model
    return [nic]


def _disks(name: str, mode: str, disk: str | None, pool: str | None, import_disk: str | None,
           size_gib: int, interface: str | None) -> list[dict]:
    disks: list[dict] = []
    if mode == "import":
        disks.append({"path": os.path.abspath(import_disk)})
    if disk is None and mode != "import":
        disk = f"{size_gib}G"
    if disk and disk.lower() != "none":
        if SIZE_RE.fullmatch(disk.strip()):
            size = disk.strip().upper().replace("IB", "").replace("B", "")
            if pool:
                disks.append({"pool": pool, "volume": f"{name}.qcow2", "size": size})
            else:
                disks.append({"path": str(images_dir() / f"{name}.qcow2"), "size": size})
        else:
            if pool:
                raise _error(("disks", 0), f"--pool takes a size for a new disk, not {disk!r}",
                             hint="--disk 20G --pool NAME, or --disk PATH without --pool")
            disks.append({"path": os.path.abspath(disk)})
    if interface:
        for d in disks:
            d["interface"] = interface
    return disks


def _install_keys(mode: str, cdrom, kernel, initrd, append) -> dict:
    if mode == "cdrom":
        return {"cdrom": os.path.abspath(cdrom), "boot": "cd"}
    if mode == "pxe":
        return {"boot": "cn"}
    if mode == "import":
        return {"boot": "c"}
    if mode == "kernel":
        k = {"path": os.path.abspath(kernel)}
        if initrd:
            k["initrd"] = os.path.abspath(initrd)
        if append:
            k["append"] = append
        return {"kernel": k}
    return {}


def new_profile(name: str, *, os_id: str | None = None, cdrom: str | None = None,
                kernel: str | None = None, initrd: str | None = None,
                append: str | None = None, import_disk: str | None = None,
                pxe: bool = False, memory: str | int | None = None,
                cpus: int | None = None, disk: str | None = None, pool: str | None = None,
                network: str | None = None, uefi: bool = False,
                display: str | None = None, check_files: bool = True) -> dict:
    """A validated profile mapping for `name` (see the module docstring for the defaults).

    `disk` is a size (`20G`: a new qcow2 image), a path (an existing image) or `none`.
    Raises ProfileError (file `kvmrun new`, with the key) for bad input, OsinfoError for an
    unknown OS or a missing osinfo-db."""
    entry = None
    if os_id:
        entry = osinfo.get(os_id)
    if initrd and not kernel:
        raise _error(("kernel", "initrd"), "--initrd needs --kernel")
    mode = install_mode(cdrom, kernel, import_disk, pxe)
    hint = suggested(entry)
    data: dict = {"name": name}
    if entry is not None:
        data["description"] = f"{entry.name} (osinfo-db {entry.short_id}), made by kvmrun new"
    data["memory"] = memory if memory not in (None, "") else hint["memory_mib"]
    data["smp"] = int(cpus) if cpus not in (None, "") else hint["cpus"]
    if uefi or (entry is not None and entry.firmware == "uefi"):
        data["firmware"] = "uefi"
    interface = None if entry is None or entry.virtio_disk else "ide"
    disks = _disks(name, mode, disk, pool, import_disk, hint["disk_gib"], interface)
    if disks:
        data["disks"] = disks
    data.update(_install_keys(mode, cdrom, kernel, initrd, append))
    data["network"] = parse_network(network, entry.nic_model if entry else None)
    display = display or ("vnc" if mode in ("cdrom", "pxe") else None)
    if display and display != "none":
        data["display"] = display
        if display == "vnc":
            data["devices"] = ["rng", "tablet"]
    validate(data, check_files)
    return data


def validate(data: dict, check_files: bool = True) -> Profile:
    """The Profile for `data` (kvmrun.profile.from_mapping); with check_files, the ISO,
    kernel and existing disks must exist."""
    prof = from_mapping(data, {(): (WHERE, None)}, WHERE)
    if check_files:
        missing = checks.missing_files(prof)
        if missing:
            raise missing[0]
    return prof


def make_dirs(data: dict) -> None:
    """Create the directory of new (sized) disks outside pools, before the first start."""
    for d in data.get("disks", []):
        if d.get("size") and d.get("path"):
            Path(d["path"]).parent.mkdir(parents=True, exist_ok=True)


def define(data: dict, *, force: bool = False, start: bool = False,
           note=lambda message: None) -> dict:
    """`kvmrun define` of a new profile mapping (validated first; the directory of its new
    disks made once it is defined), then, with `start`, `kvmrun start` of it. Returns
    name, outcome, path, warnings (and `started`: what kvmrun.ops.launch.start returned)."""
    done = defined.define(validate(data), force=force)
    make_dirs(data)
    result = {"name": done.name, "outcome": done.outcome, "path": str(done.path),
              "warnings": list(done.warnings)}
    if start:
        result["started"] = launch.start(defined.resolve(done.name), wait_ready=False,
                                         note=note)
    return result
