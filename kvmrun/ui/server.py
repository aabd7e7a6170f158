"""The `kvmrun ui` server: aiohttp, on loopback (or a unix socket), guarded by a token.

Routes: `/` (the single page), `/static/…` (its files and the npm-built vendor libraries),
`/api/…` (kvmrun.ui.api: JSON, and server-sent events for the live guest list) and
`/ws/console/NAME`, `/ws/vnc/NAME` (kvmrun.ui.bridges). Checks, in this order, on every
request: the Host header names this server, the token (cookie or ?token=), and for POSTs
and websockets an Origin equal to this server's own (kvmrun.ui.auth).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import signal
from pathlib import Path

from aiohttp import web

from kvmrun.errors import KvmrunError, UIError
from kvmrun.ui import api, auth, bridges, forms

STATIC = Path(__file__).with_name("static")
mimetypes.add_type("text/javascript", ".mjs")         # module scripts need a JS type
VENDOR_HINT = "the browser libraries are missing: run `make ui-vendor` (npm) in the source tree"


class Settings:
    def __init__(self, token: str, host: str, port: int, allow_remote: bool = False,
                 unix: bool = False):
        self.token, self.host, self.port = token, host, port
        self.allow_remote, self.unix = allow_remote, unix


def _refuse(why: str) -> web.Response:
    return web.Response(status=403, text=f"403 forbidden: {why}\n")


def guard(settings: Settings):
    @web.middleware
    async def middleware(request: web.Request, handler):
        host = request.headers.get("Host")
        if not settings.unix and not auth.host_ok(host, settings.port, settings.host,
                                                  settings.allow_remote):
            return _refuse(f"Host {host!r} is not this server")
        given = request.query.get("token") or request.cookies.get(auth.COOKIE)
        if not auth.token_ok(given, settings.token):
            return _refuse("missing or wrong token (open the URL `kvmrun ui` printed)")
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if (request.method not in auth.SAFE_METHODS or is_ws) and not auth.origin_ok(
                request.headers.get("Origin"), host):
            return _refuse(f"cross-origin request refused (Origin "
                           f"{request.headers.get('Origin')!r})")
        if request.query.get("token") and request.method == "GET" and not is_ws:
            # first visit: the token becomes a cookie and leaves the address bar
            resp = web.HTTPFound(request.rel_url.path)
            resp.set_cookie(auth.COOKIE, settings.token, httponly=True, samesite="Strict",
                            path="/")
            return resp
        try:
            resp = await handler(request)
        except KvmrunError as e:               # e.g. a bad name in a websocket's URL
            resp = web.json_response({"error": str(e)}, status=api.status_of(e))
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp
    return middleware


def make_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[guard(settings)])
    rows = api.GuestRows()
    consoles = bridges.Consoles()
    app["consoles"] = consoles
    app.add_routes(api.routes(rows))
    app.add_routes(forms.routes())

    async def index(request):
        return web.FileResponse(STATIC / "index.html")

    async def console_ws(request):
        name = request.match_info["name"]
        run = api.guest(name).paths
        paths = (run.console, run.serial_log)
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        await consoles.serve(ws, name, *paths)
        return ws

    async def vnc_ws(request):
        path = api.guest(request.match_info["name"]).paths.vnc
        ws = web.WebSocketResponse(protocols=("binary",), heartbeat=30)
        await ws.prepare(request)
        await bridges.vnc_bridge(ws, path)
        return ws

    async def on_shutdown(app):
        rows.closing.set()
        await consoles.close_all()

    app.router.add_get("/", index)
    app.router.add_get("/ws/console/{name}", console_ws)
    app.router.add_get("/ws/vnc/{name}", vnc_ws)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.on_shutdown.append(on_shutdown)
    return app


async def serve(settings: Settings, socket_path: str | None, announce,
                exit_after: float | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `exit_after` seconds); `announce(url)` once bound."""
    runner = web.AppRunner(make_app(settings), handle_signals=False, access_log=None,
                           shutdown_timeout=5)
    await runner.setup()
    if socket_path:
        _clear_stale_socket(Path(socket_path))
        site = web.UnixSite(runner, socket_path)
        await site.start()
        announce(f"http://localhost:PORT/?token={settings.token}  (unix socket {socket_path};"
                 f" forward it with ssh -L PORT:{socket_path} HOST)")
    else:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        sock = site._server.sockets[0]                      # the real port for --listen :0
        settings.port = sock.getsockname()[1]
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        announce(f"http://{shown}:{settings.port}/?token={settings.token}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_after:
        loop.call_later(exit_after, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        if socket_path:
            Path(socket_path).unlink(missing_ok=True)


def _clear_stale_socket(path: Path) -> None:
    """A socket file left by a server that died is removed; a live one is an error."""
    import socket
    import stat
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UIError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    finally:
        probe.close()
    raise UIError(f"another server is listening on {path}")


def vendor_missing() -> bool:
    return not (STATIC / "vendor" / "xterm" / "xterm.mjs").exists()
