"""libvirt domain XML in and out of the defined-VM store: read and convert a domain
(kvmrun.libvirt does the converting), the comment block naming what was approximated or
lost, the domain's UEFI variables copied into kvmrun's store."""

from __future__ import annotations

from pathlib import Path

from kvmrun import files
from kvmrun.errors import KvmrunError, Location, LostSettings, ProfileError
from kvmrun.libvirt._xml import MAX_BYTES
from kvmrun.libvirt.domain import convert
from kvmrun.ops import defined
from kvmrun.paths import nvram_path


def is_domain_xml(path: str) -> bool:
    """Whether a file looks like XML (the first non-blank byte is '<'); YAML profiles never
    start so."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def read_domain(path: str, name: str | None, lossy: bool, check_files: bool):
    """(profile, conversion) of a domain XML file; ProfileError for anything wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(Location(path), "file not found") from None
    except OSError as e:
        raise ProfileError(Location(path), f"cannot read: {e.strerror or e}") from None
    conv = convert(raw, path)
    if name:
        conv.data["name"] = name
    problems = conv.problems(check_files)
    if problems and not lossy:
        raise LostSettings(path, problems)
    return conv.profile(), conv


def comment_block(conv, check_files: bool = True) -> str:
    lines = [f"# converted from {conv.source} by kvmrun"]
    if conv.notes:
        lines.append("# approximated:")
        lines += [f"#   {f}" for f in conv.notes]
    problems = conv.problems(check_files)
    if problems:
        lines.append("# not converted (--lossy):")
        lines += [f"#   {f}" for f in problems]
    return "\n".join(lines) + "\n"


def profile_text(prof, conv, check_files: bool = True) -> str:
    return comment_block(conv, check_files) + defined.export_text(prof)


def annotate(path: Path, conv, check_files: bool = True) -> None:
    """Put the comment block (what was approximated or lost) above a defined VM's profile."""
    defined.atomic_write(path, comment_block(conv, check_files) + path.read_text(encoding="utf-8"))


def copy_nvram(source: str, name: str) -> Path:
    """Copy a domain's UEFI variable store into kvmrun's (the original is left alone)."""
    target = nvram_path(name)
    try:
        files.atomic_write(target, Path(source).read_bytes(), 0o600, make_dirs=0o700)
    except OSError as e:
        raise KvmrunError(f"cannot copy the UEFI variables {source} to {target}: "
                          f"{e.strerror or e}") from None
    return target
