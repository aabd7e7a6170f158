"""systemd verbs: install, enable, disable."""

from __future__ import annotations

from typing import Optional

import typer

from kvmrun.cli.app import app, out
from kvmrun.errors import UsageError
from kvmrun.ops import systemd

systemd_app = typer.Typer(
    help="Run guests as systemd services (one kvmrun@NAME unit per guest), and "
         "kvmrun-guests.service (autostart at boot, graceful stop at shutdown). Units go "
         "to /etc/systemd/system (--user: ~/.config/systemd/user), or $KVMRUN_SYSTEMD_DIR. "
         "KVMRUN_CONFIG_DIR, KVMRUN_RUN_DIR, KVMRUN_DATA_DIR, KVMRUN_CACHE_DIR, KVMRUN_ACCEL "
         "and KVMRUN_QEMU_USER, when set, are written to a drop-in "
         "(kvmrun@NAME.service.d/kvmrun-env.conf) so the unit finds its VM.",
    no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")

UserOpt = typer.Option(False, "--user", help="The user unit (systemctl --user).")
GuestsOpt = typer.Option(False, "--guests", help="Also kvmrun-guests.service (autostart "
                                                 "at boot, graceful stop at shutdown).")


@systemd_app.command()
def install(
    name: Optional[str] = typer.Argument(None, help="Also enable this defined VM."),
    user: bool = UserOpt,
    guests: bool = GuestsOpt,
    print_: bool = typer.Option(False, "--print", help="Print the unit files (and the "
                                                       "drop-in for NAME) instead of "
                                                       "writing them."),
) -> None:
    """Write the kvmrun@.service template unit (with this kvmrun's path)."""
    if print_:
        out(systemd.preview(name, user, guests))
        return
    for path in systemd.install(user, guests):
        out(f"installed {path}")
    if guests:
        out(systemd.enable_guests(user))
    if name:
        out(systemd.enable(name, user))


@systemd_app.command()
def enable(name: Optional[str] = typer.Argument(None, help="A defined VM."),
           user: bool = UserOpt, guests: bool = GuestsOpt) -> None:
    """Start a defined VM at boot: what `systemctl enable kvmrun@NAME` does (with its
    drop-in when KVMRUN_* variables are set). Once enabled, `kvmrun start NAME` and
    `kvmrun stop NAME` go through systemctl (--no-unit acts directly)."""
    if not name and not guests:
        raise UsageError("give a defined VM's NAME, or --guests")
    if guests:
        out(systemd.enable_guests(user))
    if name:
        out(systemd.enable(name, user))


@systemd_app.command()
def disable(name: Optional[str] = typer.Argument(None, help="A defined VM."),
            user: bool = UserOpt, guests: bool = GuestsOpt) -> None:
    """Stop starting a VM (or, with --guests, kvmrun-guests.service) at boot."""
    if not name and not guests:
        raise UsageError("give a defined VM's NAME, or --guests")
    if guests:
        out(systemd.disable(None, user))
    if name:
        out(systemd.disable(name, user))
