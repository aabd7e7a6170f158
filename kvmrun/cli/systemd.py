"""systemd verbs: install, enable, disable."""

from __future__ import annotations

from typing import Optional

import typer

from kvmrun.cli.app import app, out
from kvmrun.ops import systemd

systemd_app = typer.Typer(help="Run guests as systemd services (one unit per guest).",
                          no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")

UserOpt = typer.Option(False, "--user", help="The user unit (systemctl --user).")


@systemd_app.command()
def install(
    name: Optional[str] = typer.Argument(None, help="Also enable this defined VM."),
    user: bool = UserOpt,
    print_: bool = typer.Option(False, "--print", help="Print the unit instead of writing."),
) -> None:
    """Write the kvmrun@.service template unit (with this kvmrun's path)."""
    if print_:
        out(systemd.render(user).rstrip("\n"))
        return
    out(f"installed {systemd.install(user)}")
    if name:
        out(systemd.enable(name, user))


@systemd_app.command()
def enable(name: str = typer.Argument(..., help="A defined VM."), user: bool = UserOpt) -> None:
    """Start a defined VM at boot: what `systemctl enable kvmrun@NAME` does."""
    out(systemd.enable(name, user))


@systemd_app.command()
def disable(name: str = typer.Argument(..., help="A defined VM."),
            user: bool = UserOpt) -> None:
    """Stop starting a VM at boot."""
    out(systemd.disable(name, user))
