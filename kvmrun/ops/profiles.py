"""A PROFILE argument plus `--set` overrides and one-off flags, loaded once.

One-off flags (`--hda test.img --cdrom x.iso --boot d -m 2048`) describe a VM without a file,
or change a profile for one run: they become profile keys laid over the file's mapping
before the single validation, so every error still names its file, key and line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kvmrun import records
from kvmrun.errors import Location, ProfileError
from kvmrun.guest.rundir import Guest
from kvmrun.ops import defined
from kvmrun.paths import RunPaths, check_name, is_defined
from kvmrun.profile import Profile, from_mapping, read
from kvmrun.profile.load import ONE_OFF
from kvmrun.profile.yamlsrc import Lines
from kvmrun.qemu import compile as compiler
from kvmrun.qemu import host
from kvmrun.storage.disks import resolve_pools, with_formats

SCALARS = ("name", "arch", "machine", "accel", "cpu", "smp", "memory", "boot", "gdb")


def load_profile(ref: str | None, sets: Sequence[str] = (), oneoff: dict | None = None
                 ) -> Profile:
    """The profile of `ref` (a file or a defined VM's name; None: the one-off flags alone)."""
    sets = list(sets or ())
    flags = {k: v for k, v in (oneoff or {}).items() if v not in (None, [], ())}
    if ref is None:
        if not flags:
            raise ProfileError(Location(ONE_OFF),
                               "give a PROFILE, or one-off flags such as --hda IMAGE -m 2G")
        data, lines = {"name": "vm"}, {(): (ONE_OFF, None)}
        _lay_over(data, lines, flags)
        return resolve_pools(from_mapping(data, lines, ONE_OFF, sets))
    path = defined.locate(ref)
    if not flags:
        return defined.load(path, sets)
    data, lines = read(path)
    _lay_over(data, lines, flags)
    return resolve_pools(from_mapping(data, lines, str(path), sets, source=str(path)))


def qemu_argv(profile: Profile) -> list[str]:
    """`kvmrun cmdline`: the exact QEMU argv `profile` compiles to on this host (image
    formats detected, host probed)."""
    return compiled(profile).argv


def compiled(profile: Profile) -> compiler.Compiled:
    """QEMU's argv and the helpers' (virtiofsd, swtpm) `profile` compiles to here."""
    profile = with_formats(profile)
    return compiler.build(profile, host.probe(), RunPaths.for_guest(profile.name))


def restart_profile(name: str) -> Profile:
    """The profile a guest NAME starts again from: the defined VM NAME, else the profile
    file its last run was started from (its state records the file), under NAME."""
    check_name(name)
    if is_defined(name):
        return defined.resolve(name)
    state = Guest(name).read_state() or {}
    source = (state.get("summary") or {}).get("source")
    return records.replace(defined.resolve(source or name), name=name)


def _lay_over(data: dict, lines: Lines, flags: dict) -> None:
    """Put one-off flags into a profile mapping (and its line map) as profile keys."""
    def put(key: str, value) -> None:
        data[key] = value
        for old in [k for k in lines if k[:1] == (key,)]:
            del lines[old]
        lines[(key,)] = (ONE_OFF, None)

    disks = data.get("disks") if isinstance(data.get("disks"), list) else []
    if flags.get("hda"):                    # the first disk: every other disk moves down one
        moved = {k: v for k, v in lines.items() if k[:1] != ("disks",) or len(k) < 2
                 or not isinstance(k[1], int)}
        moved.update({("disks", k[1] + 1, *k[2:]): v for k, v in lines.items()
                      if k[:1] == ("disks",) and len(k) > 1 and isinstance(k[1], int)})
        lines.clear()
        lines.update(moved)
        disks.insert(0, {"path": os.path.abspath(flags["hda"]), "interface": "ide"})
        lines[("disks", 0)] = (ONE_OFF, None)
    for path in flags.get("disk") or []:
        lines[("disks", len(disks))] = (ONE_OFF, None)
        disks.append({"path": os.path.abspath(path)})
    if disks:
        data["disks"] = disks
        lines.setdefault(("disks",), (ONE_OFF, None))
    if flags.get("cdrom"):
        put("cdrom", os.path.abspath(flags["cdrom"]))
    kernel = {k: flags[k] for k in ("initrd", "append") if flags.get(k)}
    if flags.get("initrd"):
        kernel["initrd"] = os.path.abspath(flags["initrd"])
    if flags.get("kernel"):                 # another kernel: its own initrd and append only
        put("kernel", {"path": os.path.abspath(flags["kernel"]), **kernel})
    elif kernel and isinstance(data.get("kernel"), dict):
        for key, value in kernel.items():   # the profile's kernel, with these changed
            data["kernel"][key] = value
            lines[("kernel", key)] = (ONE_OFF, None)
    elif kernel:
        put("kernel", kernel)
    for key in SCALARS:
        if flags.get(key) is not None:
            put(key, flags[key])
    if flags.get("halted"):
        put("halted", True)
