"""Defined VMs: named profiles kept in the config directory (the `virsh define` of kvmrun).

A defined VM is a self-contained profile file `<config_dir>/vms/<name>.yaml`, in the exported
form (`extends:` resolved, paths absolute, defaults omitted, the uuid pinned), so the file alone
describes the VM and moves to another host with `kvmrun export` / `kvmrun import`.

    define(profile)      validate, then write the exported form atomically
    undefine(name)       remove it (refused while the VM runs) and its UEFI variable store
    update_from_file()   the saving half of `kvmrun edit` (validate, same name, atomic)
    export_text(profile) the self-contained YAML (`virsh dumpxml`)
    portable_dict(p)     that, for another host: .pub keys and user_data_file inlined
    list_defined()       every defined VM, broken files included (with the reason)
    defined_rows(live)   `list --defined`: each defined VM, running ones with state and PID
    resolve(ref)         a PROFILE argument: a file, or the name of a defined VM

Every write goes to a temporary file in the same directory, is fsynced and renamed over the
target, so a failed or interrupted define/edit leaves the old file intact and no partial one.
Library code raises (`errors.KvmrunError` subclasses); the CLI (`kvmrun.cli.defined`) prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence

from kvmrun import files, paths, records
from kvmrun.errors import (AlreadyDefined, Conflict, GuestError, HostError, KvmrunError,
                           Location, NotDefined, ProfileError, ProfileErrors, StoreError,
                           close_matches)
from kvmrun.guest.rundir import Guest
from kvmrun.paths import check_name, defined_path, profile_file, valid_name, vm_dir
from kvmrun.profile import Profile, to_dict
from kvmrun.profile import load as load_file
from kvmrun.qemu import checks
from kvmrun.records import field, record
from kvmrun.storage.disks import resolve_pools

FILE_MODE = 0o644
DIR_MODE = 0o755


def load(path: Path, overrides: Sequence[str] = ()) -> Profile:
    """A profile file as this host uses it (pool volumes resolved to paths)."""
    return resolve_pools(load_file(path, overrides))


# ---------------------------------------------------------------- names and places

def defined_names() -> list[str]:
    try:
        entries = list(vm_dir().iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p.stem for p in entries
                  if p.suffix == ".yaml" and not p.name.startswith(".") and p.is_file())


def require_defined(name: str) -> Path:
    check_name(name)
    path = defined_path(name)
    if not path.is_file():
        known = defined_names()
        close = close_matches(name, known)
        hint = (f"did you mean {close[0]!r}?" if close else
                "defined VMs: " + ", ".join(known) if known else
                "no VMs are defined yet; see `kvmrun define`")
        raise NotDefined(f"no defined VM named {name!r}", hint=hint)
    return path


def resolve(ref: str, overrides: Sequence[str] = ()) -> Profile:
    """A PROFILE argument (a profile file, or the name of a defined VM), loaded."""
    return load(locate(ref), overrides)


def locate(ref: str) -> Path:
    """The file of a PROFILE argument (kvmrun.paths.profile_file), or a ProfileError that
    suggests a defined VM of a close name."""
    found = profile_file(ref)
    if found is not None:
        return found
    known = defined_names()
    close = close_matches(ref, known)
    raise ProfileError(Location(ref), "no such profile file or defined VM",
                       hint=f"did you mean {close[0]!r}?" if close else
                       "give a path to a .yaml profile, or the name of a defined VM "
                       "(see `kvmrun list --defined`)")


# ---------------------------------------------------------------- the exported form

def pinned(profile: Profile) -> Profile:
    """The profile with its uuid written out, so the VM keeps its SMBIOS UUID wherever the
    file goes (the default uuid derives from the name)."""
    return records.replace(profile, uuid=profile.vm_uuid)


def export_dict(profile: Profile) -> dict:
    """Self-contained mapping: extends resolved, paths absolute, defaults omitted, uuid
    pinned."""
    return to_dict(pinned(profile))


def portable_dict(profile: Profile) -> dict:
    """export_dict for another host (`kvmrun export`, archives, migration): the files the
    profile reads only for their text are inlined, so the profile does not need them there:
    each .pub file of cloud_init.ssh_authorized_keys becomes its key, user_data_file becomes
    user_data. When `kvmrun ssh` would have found its identity beside a .pub file, that
    private key is named in ssh.identity (on another host it may not exist: `import` warns)."""
    from kvmrun.ops.ssh import login_defaults
    from kvmrun.profile.model import is_key_file
    from kvmrun.storage import cloudinit
    data = export_dict(profile)
    ci = profile.cloud_init
    if ci is None:
        return data
    section = data["cloud_init"]
    if ci.user_data_file and ci.user_data is None:
        section.pop("user_data_file")
        section["user_data"] = cloudinit.user_data_text(profile)
    if any(is_key_file(k) for k in ci.ssh_authorized_keys):
        identity = login_defaults(profile)["identity"]
        if profile.ssh.identity is None and identity:
            data.setdefault("ssh", {})["identity"] = identity
        section["ssh_authorized_keys"] = [cloudinit.key_text(profile, i, k)
                                          for i, k in enumerate(ci.ssh_authorized_keys)]
    return data


def yaml_text(data: dict) -> str:
    """A profile mapping as YAML; text of several lines (user-data, a script) as a block."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        style = "|" if "\n" in value.rstrip("\n") else None   # PyYAML falls back if it must
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)
    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)


def export_text(profile: Profile) -> str:
    import yaml
    return yaml.safe_dump(export_dict(profile), sort_keys=False, default_flow_style=False,
                          allow_unicode=True)


# ---------------------------------------------------------------- atomic files

def atomic_write(path: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a part
    (kvmrun.files.atomic_write, with the directory fsynced); errors as StoreError."""
    try:
        files.atomic_write(path, text, mode, make_dirs=DIR_MODE, sync_dir=True)
    except OSError as err:
        raise StoreError(f"cannot write {path}: {err.strerror or err}") from err


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- checks

def check(profile: Profile, check_files: bool = True) -> list[str]:
    """Validate a profile for defining: referenced files exist (unless `check_files` is false),
    machine type and CPU model are known to the installed QEMU. Raises ProfileErrors with
    every problem; returns warnings (e.g. QEMU not installed, so those were not checked)."""
    errors = checks.missing_files(profile) if check_files else []
    warnings = []
    identity = profile.ssh.identity
    if check_files and identity and not Path(identity).exists():
        warnings.append(f"ssh.identity {identity} not found: `kvmrun ssh {profile.name}` "
                        "will offer ssh's default keys (-i KEY picks one)")
    try:
        errors += checks.host_errors(profile, files=False)
    except HostError as err:
        warnings.append(f"machine type and CPU model not checked: {err.message}")
    if errors:
        raise ProfileErrors(errors)
    return warnings


def _canonical(path: Path) -> str | None:
    """The exported form of a stored file, or None if it does not load."""
    try:
        return export_text(load(path))
    except KvmrunError:
        return None


def same_uuid(profile: Profile, name: str) -> list[str]:
    """Other defined VMs that have the uuid this profile would get."""
    uuid = profile.vm_uuid.lower()
    return [vm.name for vm in list_defined()
            if vm.name != name and vm.uuid and vm.uuid.lower() == uuid]


# ---------------------------------------------------------------- define / undefine

@record(frozen=True)
class Defined:
    name: str
    path: Path
    outcome: str                   # "created", "replaced" or "unchanged"
    warnings: tuple[str, ...] = ()


def prepare(profile: Profile, name: str | None = None, new_uuid: bool = False) -> Profile:
    """The profile as it would be defined: renamed to `name`, uuid pinned (or, with
    `new_uuid`, derived from the new name)."""
    name = check_name(name or profile.name)
    if name != profile.name:
        profile = records.replace(profile, name=name)
    if new_uuid:
        profile = records.replace(profile, uuid=None)
    return pinned(profile)


def define(profile: Profile, name: str | None = None, *, force: bool = False,
           check_files: bool = True, new_uuid: bool = False) -> Defined:
    """Store `profile` as the defined VM `name` (default: its own name).

    Refuses to replace a different existing definition unless `force`; an identical one is
    left alone. Validation happens before anything is written."""
    profile = prepare(profile, name, new_uuid)
    warnings = check(profile, check_files)
    name = profile.name
    text = export_text(profile)
    path = defined_path(name)
    old = _read(path) if path.exists() else None
    if path.exists() and old is None:
        raise StoreError(f"cannot read {path}")
    if old is not None and old != text and _canonical(path) == text:
        old = text                 # written by hand, but the same VM: leave it as it is
    if old == text:
        return Defined(name, path, "unchanged", tuple(warnings))
    if old is not None and not force:
        raise AlreadyDefined(f"a different VM {name!r} is already defined ({path})",
                             hint="--force replaces it; `kvmrun edit "
                                  f"{name}` changes it; --name NEW defines a second one")
    clash = same_uuid(profile, name)
    if clash:
        warnings.append(f"uuid {profile.vm_uuid} is also the uuid of {', '.join(clash)}; "
                        "two VMs with one SMBIOS UUID confuse guests and tools (--new-uuid "
                        "derives one from the new name)")
    atomic_write(path, text)
    return Defined(name, path, "created" if old is None else "replaced", tuple(warnings))


def is_running(name: str) -> bool:
    """Whether the guest `name` is alive: its run directory's state.json names a QEMU (or a
    supervisor, which covers a start or stop in progress) that is still that very process
    (identity-checked by kvmrun.guest.rundir: boot id, start time, command line)."""
    guest = Guest(name)
    state = guest.read_state()
    if not isinstance(state, dict):
        return False
    return guest.qemu_pid(state) is not None or guest.supervisor_pid(state) is not None


@record(frozen=True)
class Undefined:
    name: str
    removed: tuple[Path, ...]
    kept: tuple[Path, ...] = ()


def undefine(name: str, keep_nvram: bool = False) -> Undefined:
    path = require_defined(name)
    if is_running(name):
        raise GuestError(f"{name} is running; stop it before undefining it",
                         hint=f"kvmrun stop {name}")
    removed, kept = [], []
    try:
        path.unlink()
    except OSError as err:
        raise StoreError(f"cannot remove {path}: {err.strerror or err}") from err
    removed.append(path)
    mark = paths.autostart_path(name)             # `kvmrun autostart NAME`
    if mark.is_symlink() or mark.exists():
        mark.unlink()
        removed.append(mark)
    nvram = paths.nvram_path(name)
    if nvram.exists():
        if keep_nvram:
            kept.append(nvram)
        else:
            try:
                nvram.unlink()
                removed.append(nvram)
            except OSError as err:
                raise StoreError(f"{name} is undefined, but its UEFI variable store {nvram} "
                                 f"could not be removed: {err.strerror or err}") from err
    tpm = paths.tpm_state_dir(name)
    if tpm.is_dir():                  # the TPM's state goes with the VM, as its vars do
        if keep_nvram:
            kept.append(tpm)
        else:
            import shutil    # here: shutil brings bz2 and lzma (~3 ms of every start)
            shutil.rmtree(tpm, ignore_errors=True)
            if tpm.exists():
                raise StoreError(f"{name} is undefined, but its TPM state {tpm} could not "
                                 "be removed")
            removed.append(tpm)
    return Undefined(name, tuple(removed), tuple(kept))


# ---------------------------------------------------------------- edit

def edit_copy(name: str) -> tuple[Path, str]:
    """A temporary copy of the defined VM for an editor, in the VM directory (so relative
    paths typed into it resolve as they would in the stored file). Returns (copy, original)."""
    path = require_defined(name)
    original = path.read_text(encoding="utf-8")
    import tempfile                    # here: it imports random (~1.5 ms of every start)
    fd, tmp = tempfile.mkstemp(dir=vm_dir(), prefix=f".{name}.edit-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(original)
    return Path(tmp), original


def load_edited(name: str, copy: Path, check_files: bool = True) -> tuple[Profile, list[str]]:
    """Validate the edited copy as the new definition of `name`; ProfileError if it is wrong
    (including a changed `name:`)."""
    profile = load(copy)
    if profile.name != name:
        raise ProfileError(profile.location("name"),
                           f"the name cannot change in `kvmrun edit` (this is {name!r}, "
                           f"the file says {profile.name!r})",
                           hint=f"to rename: kvmrun define {name} --name {profile.name} "
                                f"&& kvmrun undefine {name}")
    return profile, check(profile, check_files)


def save_edited(name: str, profile: Profile, original: str) -> bool:
    """Store the edited profile if it differs from `original`; False if unchanged. Raises
    Conflict if the stored file is no longer `original` (changed by someone else)."""
    text = export_text(pinned(profile))
    path = defined_path(name)
    if text == original:
        return False
    if _read(path) != original:
        raise Conflict(f"{path} changed while you were editing it; not saved")
    atomic_write(path, text)
    return True


# ---------------------------------------------------------------- listing

@record(frozen=True)
class DefinedVM:
    name: str
    path: Path
    arch: str | None = None
    memory: int | None = None              # MiB
    smp: int | None = None
    disks: tuple[str, ...] = ()
    uuid: str | None = None
    description: str | None = None
    error: str | None = field(default=None)  # the file does not load (edited by hand?)

    def to_json(self) -> dict:
        return {"name": self.name, "arch": self.arch, "memory_mib": self.memory,
                "vcpus": self.smp, "disks": list(self.disks), "uuid": self.uuid,
                "description": self.description, "file": str(self.path),
                "error": self.error}


def list_defined() -> list[DefinedVM]:
    """Every `<config_dir>/vms/*.yaml`, sorted by name; a file that no longer loads is listed
    with `error` set rather than hidden."""
    out = []
    for name in defined_names():
        path = defined_path(name)
        try:
            p = load(path)
        except KvmrunError as err:
            out.append(DefinedVM(name, path, error=str(err).splitlines()[0]))
            continue
        error = None
        if not valid_name(name):
            error = f"{path.name}: the file name is not a valid VM name"
        elif p.name != name:
            error = f"the file says name: {p.name!r}; rename the file or fix the name"
        out.append(DefinedVM(name, path, p.arch, p.memory, p.smp,
                             tuple(d.path for d in p.disks), p.vm_uuid, p.description, error))
    return out


def defined_rows(live: list[dict]) -> list[dict]:
    """`list --defined`: one row per defined VM, a running one as its live row from `live`
    (kvmrun.ops.inspect.list_guests: state and PID), the others as `defined`."""
    running = {r["name"]: r for r in live if r["pid"]}
    return [running.get(vm.name) or {
        "name": vm.name, "state": "defined", "pid": None, "memory_mib": vm.memory,
        "vcpus": vm.smp, "uptime": None, "ended": None} for vm in list_defined()]
