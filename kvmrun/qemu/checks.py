"""Checks of a profile against this host: referenced files exist, the NICs' files exist,
no backing-file overlay kvmrun made is lost (kvmrun.storage.overlays) or based on another file
than the profile's `backing:` (kvmrun.storage.rebase), the QEMU binary is installed, the
helpers a profile needs are (virtiofsd, swtpm), and the machine type and CPU model are ones
the installed QEMU knows (with close matches suggested). `kvmrun validate`, `define` and
`start` run these; the compiler does not."""

from __future__ import annotations

import os

from pathlib import Path

from kvmrun import proc
from kvmrun.errors import ProfileError, ProfileErrors, close_matches
from kvmrun.net.checks import file_errors
from kvmrun.profile import Profile, referenced_files
from kvmrun.qemu import host
from kvmrun.qemu.compile import SWTPM_PACKAGE, VIRTIOFSD_PACKAGE, virtiofs_shares
from kvmrun.storage.overlays import lost
from kvmrun.storage.rebase import mismatched


def missing_files(profile: Profile, carried: frozenset[str] = frozenset()
                  ) -> list[ProfileError]:
    """Every file the profile refers to that is not there (all of them, not the first);
    `carried`: paths that will be (an archive's disks, before they are unpacked)."""
    return [ProfileError(loc, f"{what} {path!r} not found")       # nfs:// URLs: QEMU's to open
            for loc, what, path in referenced_files(profile)
            if not path.startswith("nfs://") and path not in carried
            and not Path(path).exists()]


def _close(word: str, known: list[str]) -> str:
    matches = close_matches(word, known, n=3, cutoff=0.5)
    return f" (close matches: {', '.join(matches)})" if matches else ""


def host_errors(profile: Profile, files: bool = True) -> list[ProfileError]:
    """Everything wrong with the profile on this host; HostError if QEMU is missing."""
    errors = missing_files(profile) if files else []
    if files:
        errors += file_errors(profile)
        errors += lost(profile)
        errors += mismatched(profile)
    errors += helper_errors(profile)
    binary = host.qemu_binary(profile.arch)
    if profile.machine:
        known = host.qemu_machines(binary)
        if profile.machine not in known:
            errors.append(ProfileError(
                profile.location("machine"),
                f"machine type {profile.machine!r} is not known to {binary}"
                + _close(profile.machine, known),
                hint=f"list them with: {binary} -machine help"))
    if profile.cpu:
        model = profile.cpu.split(",")[0]
        known = host.qemu_cpus(binary)
        if model not in known:
            errors.append(ProfileError(
                profile.location("cpu"),
                f"CPU model {model!r} is not known to {binary}" + _close(model, known),
                hint=f"list them with: {binary} -cpu help"))
    return errors


def helper_errors(profile: Profile) -> list[ProfileError]:
    """The helper daemons the profile needs, missing or unable to run here."""
    errors = []
    shares = virtiofs_shares(profile)
    if shares and host.virtiofsd_binary() is None:
        errors.append(ProfileError(profile.location("shares", shares[0], "type"),
                                   "virtiofs shares need virtiofsd, which is not installed",
                                   hint=f"install {VIRTIOFSD_PACKAGE}, or use type: 9p"))
    elif shares and os.geteuid() != 0:
        errors.append(ProfileError(profile.location("shares", shares[0], "type"),
                                   "virtiofsd needs root (its sandbox makes namespaces)",
                                   hint="run kvmrun as root, or use type: 9p (no root needed)"))
    if profile.tpm:
        for program in ("swtpm", "swtpm_setup"):
            if proc.which(program) is None:
                errors.append(ProfileError(profile.location("tpm"),
                                           f"tpm: true needs {program}, which is not installed",
                                           hint=f"install it: apt-get install {SWTPM_PACKAGE}"))
    return errors


def check(profile: Profile, files: bool = True) -> None:
    errors = host_errors(profile, files)
    if errors:
        raise ProfileErrors(errors)
