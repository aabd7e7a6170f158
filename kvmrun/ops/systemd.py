"""systemd units: render the template unit with this kvmrun's path, install it, and enable
or disable a guest's instance (what `systemctl enable kvmrun@NAME` does)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvmrun import files, proc
from kvmrun.errors import GuestError, HostError
from kvmrun.paths import is_defined

UNIT = "kvmrun@.service"
SOURCE = Path(__file__).resolve().parents[1] / "units"  # a link to systemd/ in the repo


def template_text(user: bool) -> str:
    """The unit file shipped in systemd/ (user variant under systemd/user/)."""
    path = SOURCE / ("user" if user else "") / UNIT
    try:
        return path.read_text()
    except OSError as err:
        raise HostError(f"cannot read the unit template {path}: {err.strerror}") from err


def kvmrun_command() -> str:
    """How systemd should run this very kvmrun: its interpreter with -m kvmrun."""
    return f"{sys.executable} -m kvmrun"


def render(user: bool) -> str:
    return template_text(user).replace("ExecStart=/usr/bin/env kvmrun ",
                                       f"ExecStart={kvmrun_command()} ")


def unit_dir(user: bool) -> Path:
    if os.environ.get("KVMRUN_SYSTEMD_DIR"):
        return Path(os.environ["KVMRUN_SYSTEMD_DIR"])
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _systemctl(user: bool, *args: str) -> None:
    proc.run(["systemctl", *(["--user"] if user else []), *args])


def install(user: bool) -> Path:
    target = unit_dir(user) / UNIT
    files.atomic_write(target, render(user), 0o644, make_dirs=0o755)
    if systemd_running():
        _systemctl(user, "daemon-reload")
    return target


def instance(name: str) -> str:
    return f"kvmrun@{name}.service"


def _wants_link(name: str, user: bool) -> Path:
    target = "default.target" if user else "multi-user.target"
    return unit_dir(user) / f"{target}.wants" / instance(name)


def enable(name: str, user: bool) -> str:
    """Enable kvmrun@NAME; returns a sentence saying what was done."""
    if not is_defined(name):
        raise GuestError(f"{name!r} is not a defined VM",
                         hint=f"define it first: kvmrun define PROFILE --name {name}")
    if not (unit_dir(user) / UNIT).exists():
        install(user)
    if systemd_running():
        _systemctl(user, "enable", instance(name))
        return f"enabled {instance(name)}; start it now with: systemctl " \
               f"{'--user ' if user else ''}start {instance(name)}"
    link = _wants_link(name, user)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(unit_dir(user) / UNIT)
    return (f"systemd is not running here: linked {link}; {instance(name)} starts at the "
            "next boot")


def disable(name: str, user: bool) -> str:
    if systemd_running():
        _systemctl(user, "disable", instance(name))
        return f"disabled {instance(name)}"
    link = _wants_link(name, user)
    if link.is_symlink() or link.exists():
        link.unlink()
        return f"systemd is not running here: removed {link}"
    return f"{instance(name)} was not enabled"
