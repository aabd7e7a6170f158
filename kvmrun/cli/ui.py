"""`kvmrun ui`: serve the local web front end. The only verb that imports aiohttp."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from kvmrun.cli.app import app, err, out
from kvmrun.errors import UIError


@app.command()
def ui(
    listen: str = typer.Option("127.0.0.1:8470", "--listen", metavar="HOST:PORT",
                               help="Address to serve on (port 0: any free port). Loopback "
                                    "only, unless --allow-remote."),
    socket: Optional[str] = typer.Option(None, "--socket", metavar="PATH",
                                         help="Serve on a unix socket instead (reach it with "
                                              "ssh -L PORT:PATH HOST)."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Allow a non-loopback --listen (the token is then "
                                           "all that guards your VMs; prefer ssh -L)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the URL in a browser."),
    token: Optional[str] = typer.Option(None, "--token", envvar="KVMRUN_UI_TOKEN",
                                        help="Access token (default: a new random one)."),
    exit_after: Optional[float] = typer.Option(None, "--exit-after", metavar="SECONDS",
                                               help="Stop serving after this long (tests, "
                                                    "demos)."),
) -> None:
    """Serve the web UI: guests (live list, start/stop/pause/reset, console, display),
    New VM, networks and storage. Prints its URL with an access token (as Jupyter does);
    the first visit turns the token into a cookie.

    Guests keep running when the server stops; an open page reconnects when a server with
    the same token is back (KVMRUN_UI_TOKEN, or --token: visible in ps, so prefer the
    variable)."""
    from kvmrun.ui import auth                 # light: no aiohttp
    host, port = auth.parse_listen(listen, allow_remote)
    try:
        import asyncio
        from kvmrun.ui import server
    except ImportError as e:
        raise UIError(f"kvmrun ui needs aiohttp ({e})",
                           hint="pip install 'kvmrun[ui]' (or: apt-get install "
                                "python3-aiohttp)") from None
    if server.vendor_missing():
        err(f"kvmrun: warning: {server.VENDOR_HINT}; the console and display pages will "
            "not work")
    settings = server.Settings(token or auth.new_token(), host, port, allow_remote,
                               unix=bool(socket))

    def announce(url: str) -> None:
        out(f"kvmrun ui: {url}")
        err("  open it in a browser; Ctrl-C stops the server (guests keep running)")
        sys.stdout.flush()
        if open_browser:
            import webbrowser
            webbrowser.open(url)
    try:
        asyncio.run(server.serve(settings, socket, announce, exit_after))
    except OSError as e:
        raise UIError(f"cannot serve on {socket or listen}: {e.strerror or e}",
                           hint="choose another port with --listen 127.0.0.1:PORT "
                                "(0 picks a free one)") from None
