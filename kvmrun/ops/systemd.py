"""systemd units: render the template units with this kvmrun's path, install them, carry
kvmrun's environment into a drop-in, enable or disable a guest's instance (what `systemctl
enable kvmrun@NAME` does), and decide when `kvmrun start`/`stop` go through systemctl.

    kvmrun@.service                      one guest (`kvmrun run %i`, the supervisor in front)
    kvmrun@NAME.service.d/kvmrun-env.conf  KVMRUN_* directories it was enabled with
    kvmrun-guests.service                libvirt-guests' job (`kvmrun guests start|stop`)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvmrun import files, proc
from kvmrun.errors import GuestError, HostError, LaunchError, UsageError
from kvmrun.guest.notify import current_unit
from kvmrun.paths import check_name, is_defined

UNIT = "kvmrun@.service"
GUESTS = "kvmrun-guests.service"
DROPIN = "kvmrun-env.conf"
SOURCE = Path(__file__).resolve().parents[1] / "units"  # a link to systemd/ in the repo
# What a unit must share with the kvmrun that installed it to find and run its VM
CARRIED = ("KVMRUN_CONFIG_DIR", "KVMRUN_RUN_DIR", "KVMRUN_DATA_DIR", "KVMRUN_CACHE_DIR",
           "KVMRUN_ACCEL", "KVMRUN_QEMU_USER")
DIRS = ("KVMRUN_CONFIG_DIR", "KVMRUN_RUN_DIR", "KVMRUN_DATA_DIR", "KVMRUN_CACHE_DIR")
PRIVATE_TMP = ("/tmp", "/var/tmp")          # what the units' PrivateTmp=yes hides


def template_text(user: bool, unit: str = UNIT) -> str:
    """A unit file shipped in systemd/ (user variants under systemd/user/)."""
    path = SOURCE / ("user" if user else "") / unit
    try:
        return path.read_text()
    except OSError as err:
        raise HostError(f"cannot read the unit template {path}: {err.strerror}") from err


def kvmrun_command() -> str:
    """How systemd should run this very kvmrun: its interpreter with -m kvmrun."""
    return f"{sys.executable} -m kvmrun"


def render(user: bool, unit: str = UNIT) -> str:
    return "\n".join(
        line.replace("=/usr/bin/env kvmrun ", f"={kvmrun_command()} ", 1)
        if line.startswith(("ExecStart=", "ExecStop=")) else line
        for line in template_text(user, unit).split("\n"))


def unit_dir(user: bool) -> Path:
    if os.environ.get("KVMRUN_SYSTEMD_DIR"):
        return Path(os.environ["KVMRUN_SYSTEMD_DIR"])
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def systemd_running() -> bool:
    """sd_booted(3): systemd is the init system here."""
    return Path("/run/systemd/system").is_dir()


def instance(name: str) -> str:
    return f"kvmrun@{name}.service"


# ---------------------------------------------------------------- the environment drop-in

def carried_env(environ: dict | None = None) -> dict[str, str]:
    """The KVMRUN_* variables set here that a unit needs to find its VM (directories made
    absolute: systemd does not run units in this working directory)."""
    environ = os.environ if environ is None else environ
    return {key: (os.path.abspath(environ[key]) if key in DIRS else environ[key])
            for key in CARRIED if environ.get(key)}


def _quoted(assignment: str) -> str:
    """One Environment= value, quoted for systemd (C escapes, % doubled: specifiers)."""
    escaped = assignment.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def dropin_text(env: dict[str, str]) -> str | None:
    """The drop-in that gives a unit these variables; None when there are none."""
    if not env:
        return None
    lines = ["# Written by kvmrun: the KVMRUN_* environment this unit was enabled with, so",
             "# it finds its VM (rewritten by `kvmrun systemd enable`).", "[Service]"]
    lines += [f"Environment={_quoted(f'{key}={value}')}" for key, value in env.items()]
    hidden = [env[k] for k in DIRS if k in env
              and any(env[k] == t or env[k].startswith(t + "/") for t in PRIVATE_TMP)]
    if hidden:
        lines += ["# under /tmp or /var/tmp, which the unit's PrivateTmp=yes would hide: "
                  + ", ".join(hidden), "PrivateTmp=no"]
    return "\n".join(lines) + "\n"


def dropin_path(unit: str, user: bool) -> Path:
    return unit_dir(user) / f"{unit}.d" / DROPIN


def write_dropin(unit: str, user: bool) -> Path | None:
    """Write (or, with the default environment, remove) the unit's drop-in; returns its
    path when one is in place."""
    path = dropin_path(unit, user)
    text = dropin_text(carried_env())
    if text is None:
        if path.exists():
            path.unlink()
        return None
    files.atomic_write(path, text, 0o644, make_dirs=0o755)
    return path


def preview(name: str | None, user: bool, guests: bool = False) -> str:
    """What `install --print` shows: each file it would write, headed by its path (the
    way `systemctl cat` shows a unit)."""
    shown = [(unit_dir(user) / UNIT, render(user))]
    units = ([instance(check_name(name))] if name else []) + ([GUESTS] if guests else [])
    if guests:
        shown.append((unit_dir(user) / GUESTS, render(user, GUESTS)))
    for unit in units:
        text = dropin_text(carried_env())
        shown.append((dropin_path(unit, user), text or
                      "# (none: kvmrun's default directories; a drop-in is written only "
                      "when KVMRUN_* variables move them)\n"))
    return "\n".join(f"# {path}\n{text.rstrip()}\n" for path, text in shown).rstrip("\n")


# ---------------------------------------------------------------- install, enable, disable

def systemctl(user: bool, *args: str, timeout: float = 120):
    """systemctl's CompletedProcess (subprocess is imported by kvmrun.proc when it runs
    one, not here: a plain `kvmrun stop` asks this module whether a unit runs the guest)."""
    return proc.run(["systemctl", *(["--user"] if user else []), *args], check=False,
                    timeout=timeout, what=f"systemctl {args[0]}")


def _checked(user: bool, *args: str) -> None:
    done = systemctl(user, *args)
    if done.returncode != 0:
        raise failure(done, args[0], " ".join(args[1:]), user)


def install(user: bool, guests: bool = False) -> list[Path]:
    written = []
    for unit in (UNIT, GUESTS) if guests else (UNIT,):
        target = unit_dir(user) / unit
        files.atomic_write(target, render(user, unit), 0o644, make_dirs=0o755)
        written.append(target)
    if guests:
        dropin = write_dropin(GUESTS, user)
        written += [dropin] if dropin else []
    if systemd_running():
        _checked(user, "daemon-reload")
    return written


def _wants_link(unit: str, user: bool) -> Path:
    target = "default.target" if user else "multi-user.target"
    return unit_dir(user) / f"{target}.wants" / unit


def _enable(unit: str, template: str, user: bool) -> str:
    dropin = write_dropin(unit, user)
    note = f" (environment in {dropin})" if dropin else ""
    if systemd_running():
        _checked(user, "daemon-reload")
        _checked(user, "enable", unit)
        return f"enabled {unit}{note}; start it now with: systemctl " \
               f"{'--user ' if user else ''}start {unit}"
    link = _wants_link(unit, user)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(unit_dir(user) / template)
    return (f"systemd is not running here: linked {link}{note}; {unit} starts at the "
            "next boot")


def enable(name: str, user: bool) -> str:
    """Enable kvmrun@NAME; returns a sentence saying what was done."""
    if not is_defined(name):
        raise GuestError(f"{name!r} is not a defined VM",
                         hint=f"define it first: kvmrun define PROFILE --name {name}")
    if not (unit_dir(user) / UNIT).exists():
        install(user)
    return _enable(instance(name), UNIT, user)


def enable_guests(user: bool) -> str:
    if not (unit_dir(user) / GUESTS).exists():
        install(user, guests=True)
    return _enable(GUESTS, GUESTS, user)


def disable(name: str | None, user: bool) -> str:
    """Disable kvmrun@NAME (name None: kvmrun-guests.service). The drop-in stays: a
    `systemctl start` by hand still finds the VM."""
    unit = instance(name) if name else GUESTS
    if systemd_running():
        _checked(user, "disable", unit)
        return f"disabled {unit}"
    link = _wants_link(unit, user)
    if link.is_symlink() or link.exists():
        link.unlink()
        return f"systemd is not running here: removed {link}"
    return f"{unit} was not enabled"


# ---------------------------------------------------------------- start and stop through units

def user_units() -> bool:
    """Root's guests are system units; everyone else's are `systemctl --user` units."""
    return os.geteuid() != 0


def _ask(user: bool, verb: str, unit: str) -> str:
    """What `systemctl is-enabled|is-active UNIT` says; no answer at all (systemd does not
    answer) is an error, not a silent "no"."""
    done = systemctl(user, verb, unit, timeout=30)
    said = done.stdout.strip()
    if not said and done.stderr.strip():
        raise failure(done, verb, unit, user)
    return said


def is_enabled(unit: str, user: bool) -> bool:
    return _ask(user, "is-enabled", unit) in ("enabled", "enabled-runtime")


def is_active(unit: str, user: bool) -> bool:
    return _ask(user, "is-active", unit) in ("active", "activating", "reloading",
                                              "deactivating")


def unit_for(name: str, running_in: str | None = None) -> str | None:
    """The unit `kvmrun start NAME` / `stop NAME` should go through, or None to act
    directly: systemd runs, NAME is a defined VM, and its kvmrun@NAME is enabled (or, for
    stop, runs the guest now: `running_in` is the unit its supervisor records). Never from
    inside that very unit (its own `kvmrun run` must not call back into systemctl)."""
    unit = instance(name)
    if not systemd_running() or not is_defined(name) or current_unit() == unit:
        return None
    if running_in == unit:
        return unit
    user = user_units()
    if not installed(user):          # no template: nothing to ask systemctl (a user without
        return None                  # a user manager must still start guests)
    return unit if (is_enabled(unit, user) or is_active(unit, user)) else None


def installed(user: bool) -> bool:
    """Whether a kvmrun@.service template is where systemd would find it."""
    places = ([unit_dir(True), Path("/etc/systemd/user"), Path("/usr/lib/systemd/user")]
              if user else [unit_dir(False), Path("/usr/lib/systemd/system"),
                            Path("/lib/systemd/system")])
    return any((place / UNIT).exists() for place in places)


def refuse_options(unit: str, given: list[str]) -> None:
    """Options a unit cannot pass on: say so rather than drop them."""
    if given:
        raise UsageError(f"{unit} is enabled: `kvmrun start`/`stop` go through systemctl, "
                         f"which cannot pass {', '.join(given)}",
                         hint="add --no-unit to run it outside the unit (systemd then "
                              "does not supervise that run)")


def failure(done, action: str, unit: str, user: bool) -> Exception:
    """A failed systemctl call as a kvmrun error: systemctl's own words, and where to look.
    Cannot reach systemd: exit 3; the unit failed to start: exit 7; to stop: exit 4."""
    said = (done.stderr.strip() or done.stdout.strip() or "no output")
    text = f"systemctl {' '.join(filter(None, (action, unit)))} failed " \
           f"(exit {done.returncode}): {said}"
    sc = f"systemctl {'--user ' if user else ''}"
    unreachable = ("not been booted with systemd", "Failed to connect to bus",
                   "Failed to connect to", "Transport endpoint is not connected")
    if any(s in said for s in unreachable):
        return HostError(text, hint="systemd does not answer here; `kvmrun start|stop "
                                    "--no-unit` act without it")
    if "Access denied" in said or "Interactive authentication required" in said:
        return HostError(text, hint=f"run it as root, or as a user unit ({sc.strip()})")
    hint = (f"see `{sc}status {unit}` and `journalctl {'--user ' if user else ''}-u {unit}`"
            f"; --no-unit runs the guest outside the unit")
    if action == "start":
        return LaunchError(text, hint=hint)
    return GuestError(text, hint=hint) if action == "stop" else HostError(text, hint=hint)


def start_unit(unit: str, wait: bool = True) -> None:
    """`systemctl start` (Type=notify: returns once the supervisor said READY=1, i.e. the
    guest is ready as `kvmrun start` means it)."""
    user = user_units()
    done = systemctl(user, "start", *([] if wait else ["--no-block"]), unit, timeout=600)
    if done.returncode != 0:
        raise failure(done, "start", unit, user)


def stop_unit(unit: str) -> None:
    """`systemctl stop`: SIGTERM to the supervisor, which runs the profile's shutdown
    method and timeout, then escalates (the unit's stop is always forced)."""
    user = user_units()
    done = systemctl(user, "stop", unit, timeout=900)
    if done.returncode != 0:
        raise failure(done, "stop", unit, user)
