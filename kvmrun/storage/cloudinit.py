"""cloud-init NoCloud seeds: the profile's `cloud_init:` section as an ISO 9660 image
labelled `cidata` (user-data, meta-data, network-config), attached as a read-only CD-ROM.

`render(profile)` gives the seed's files (pure but for reading user_data_file and .pub key
files); `build_seed(profile, iso)` writes the ISO with genisoimage, xorriso or mkisofs, and
only when the inputs changed since the last build (a hash is kept next to the image).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from kvmrun.errors import HostError, ProfileError
from kvmrun.profile import Profile

LABEL = "cidata"


def _read(profile: Profile, path: str, *where) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise ProfileError(profile.location("cloud_init", *where),
                           f"cannot read {path}: {err.strerror}") from err


def _key(profile: Profile, i: int, key: str) -> str:
    """A public key, or (for a value ending in .pub) the key in that file."""
    key = key.strip()
    if key.endswith(".pub") and "\n" not in key and " " not in key:
        base = Path(profile.source).resolve().parent if profile.source else Path.cwd()
        return _read(profile, str(base / Path(key).expanduser()),
                     "ssh_authorized_keys", i).strip()
    return key


def render(profile: Profile) -> dict[str, str]:
    """The seed's files: {'user-data': …, 'meta-data': …[, 'network-config': …]}."""
    ci = profile.cloud_init
    assert ci is not None
    if ci.user_data is not None and ci.user_data_file:
        raise ProfileError(profile.location("cloud_init", "user_data_file"),
                           "give user_data or user_data_file, not both")
    user = (_read(profile, ci.user_data_file, "user_data_file") if ci.user_data_file
            else ci.user_data if ci.user_data is not None else "#cloud-config\n")
    shortcuts = {}
    if ci.hostname:
        shortcuts["hostname"] = ci.hostname
    if ci.ssh_authorized_keys:
        shortcuts["ssh_authorized_keys"] = [_key(profile, i, k)
                                            for i, k in enumerate(ci.ssh_authorized_keys)]
    if ci.password is not None:
        shortcuts.update(password=ci.password, chpasswd={"expire": False}, ssh_pwauth=True)
    if shortcuts:
        if not user.lstrip().startswith("#cloud-config"):
            raise ProfileError(profile.location("cloud_init"),
                               "hostname, ssh_authorized_keys and password go into "
                               "#cloud-config user-data, but this user-data is not that",
                               hint="write them into your user-data yourself")
        try:
            config = yaml.safe_load(user) or {}
        except yaml.YAMLError as err:
            raise ProfileError(profile.location("cloud_init", "user_data"),
                               f"user-data is not valid YAML: {err}") from err
        if not isinstance(config, dict):
            raise ProfileError(profile.location("cloud_init", "user_data"),
                               "#cloud-config user-data must be a mapping")
        keys = shortcuts.pop("ssh_authorized_keys", [])
        if keys:
            config["ssh_authorized_keys"] = list(config.get("ssh_authorized_keys") or []) + keys
        config.update(shortcuts)
        user = "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)
    meta: dict = {}
    if ci.meta_data:
        try:
            loaded = yaml.safe_load(ci.meta_data)
        except yaml.YAMLError as err:
            raise ProfileError(profile.location("cloud_init", "meta_data"),
                               f"meta-data is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ProfileError(profile.location("cloud_init", "meta_data"),
                               "meta-data must be a mapping")
        meta = loaded
    meta.setdefault("instance-id", profile.vm_uuid)
    meta.setdefault("local-hostname", ci.hostname or profile.name)
    files = {"user-data": user, "meta-data": yaml.safe_dump(meta, sort_keys=False)}
    if ci.network_config:
        files["network-config"] = ci.network_config
    return files


def _tool() -> list[str]:
    for name in ("genisoimage", "mkisofs"):
        found = shutil.which(name)
        if found:
            return [found]
    found = shutil.which("xorriso")
    if found:
        return [found, "-as", "mkisofs"]
    raise HostError("no ISO 9660 tool to build the cloud-init seed",
                    hint="install one: apt-get install genisoimage (or xorriso)")


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def build_seed(profile: Profile, iso: Path) -> bool:
    """Write the seed ISO unless one built from the same inputs is there; True if built."""
    files = render(profile)
    stamp = iso.with_suffix(".sha256")
    want = digest(files)
    if iso.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return False
    iso.parent.mkdir(parents=True, exist_ok=True)
    tmp = iso.with_name(f".{iso.name}.tmp")
    with tempfile.TemporaryDirectory(prefix="kvmrun-seed-") as work:
        for name, text in files.items():
            Path(work, name).write_text(text)
        proc = subprocess.run([*_tool(), "-quiet", "-output", str(tmp), "-volid", LABEL,
                               "-joliet", "-rock", *sorted(files)], cwd=work,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HostError(f"building the cloud-init seed failed: {proc.stderr.strip()}")
    os.replace(tmp, iso)
    stamp.write_text(want + "\n")
    return True
