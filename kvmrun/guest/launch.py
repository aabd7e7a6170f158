"""The launch record (`launch.json`): what a guest's supervisor runs, and the facts about the
guest that every later command reads (disks, shares, forwards, shutdown settings).

Written once by `kvmrun start`/`run` (kvmrun.ops.launch) before the supervisor starts, read
only through `LaunchRecord.read`. Versioned: a guest started by an older kvmrun keeps
stopping and reporting after an upgrade. Version 0 is the unversioned record of kvmrun 0.1
(the same keys, no "version"); each new version says here what it changed.

    1   adds "version"
    2   adds "serial_log_max" (bytes; serial.log is rotated at that size) and "run_id"
        (one start's id: its supervisor writes only while launch.json still carries it)
    3   adds "machine_type": the versioned machine type behind an alias (pc ->
        pc-i440fx-7.2), so a migration target runs the very machine the guest runs
    4   adds "helpers": the guest's helper daemons, [{name, argv, socket}] (virtiofsd for a
        virtiofs share, swtpm for a TPM), started by the supervisor before QEMU and ended
        after it (kvmrun.guest.helpers); and "type" (9p, virtiofs) in each of "shares"
    5   adds "cgroup": where the profile's limits apply (kvmrun.guest.cgroup): {"leaf":
        DIR} (the supervisor moves QEMU in before exec, removes DIR after), {"scope": ARGV}
        (QEMU starts behind that systemd-run prefix), or None

Standard library only (a plain class: the supervisor imports it).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvmrun import files

VERSION = 5

# field -> default for records that lack it (older versions)
FIELDS: dict[str, object] = {
    "argv": [],
    "disks": [],                  # every disk path, in profile order
    "shared_disks": [],           # disks only read (read-only, bases of ephemeral disks)
    "ephemeral_disks": [],        # indexes of ephemeral disks
    "shares": [],                 # [{path, tag, readonly, type}] (no type: 9p, v1-v3)
    "ready_console": None,        # a regex the console must print to count as ready
    "ready_timeout": 300,
    "shutdown_timeout": 60,
    "shutdown_method": "acpi",
    "shutdown_command": "poweroff",
    "serial_log_max": 8 << 20,    # bytes; the supervisor rotates serial.log at this size
    "run_id": None,               # this start's id (a new start writes a new one)
    "summary": {},                # arch, machine, accel, smp, memory, source, forwards,
                                  # ssh ({user, identity}: `kvmrun ssh`'s defaults; optional)
    "machine_type": None,         # the versioned machine type (None: not known, v1/v2)
    "helpers": [],                # [{name, argv, socket}]: started before QEMU, in order
    "cgroup": None,               # {"leaf": DIR} or {"scope": ARGV}: limits (v5)
}


class LaunchRecord:
    __slots__ = ("version",) + tuple(FIELDS)

    def __init__(self, **values):
        unknown = set(values) - set(FIELDS) - {"version"}
        if unknown:
            raise TypeError(f"unknown launch record fields: {sorted(unknown)}")
        self.version = values.pop("version", VERSION)
        for key, default in FIELDS.items():
            value = values.get(key, default)
            setattr(self, key, list(value) if isinstance(value, tuple) else value)

    # the summary's facts, named
    forwards = property(lambda self: list(self.summary.get("forwards", [])))
    ssh_login = property(lambda self: dict(self.summary.get("ssh") or {}))

    def to_json(self) -> dict:
        return {"version": self.version, **{k: getattr(self, k) for k in FIELDS}}

    def write(self, path: Path) -> None:
        files.write_json(path, self.to_json(), durable=False)  # the run directory's

    @classmethod
    def from_json(cls, data: object) -> "LaunchRecord":
        if not isinstance(data, dict):
            raise ValueError("a launch record is a JSON object")
        version = data.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise ValueError(f"launch record version {version!r} is newer than this kvmrun "
                             f"reads ({VERSION})")
        return cls(version=version, **{k: data[k] for k in FIELDS if k in data})

    @classmethod
    def read(cls, path: Path) -> "LaunchRecord":
        """The record at `path`; OSError when missing, ValueError when unreadable."""
        return cls.from_json(json.loads(Path(path).read_text()))
