"""The JSON API behind the pages. Each handler is one library call (kvmrun.ops and the
backends: the same calls the CLI makes for the same verb), run in a worker thread; a
KvmrunError comes back as `{"error": MESSAGE}` with the text the CLI prints after
`kvmrun: error:`."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from aiohttp import web

from kvmrun import paths, proc
from kvmrun.errors import GuestError, KvmrunError
from kvmrun.guest.rundir import Guest
from kvmrun.ops import defined, inspect, launch, power, profiles
from kvmrun.ops import snapshots as snapops          # `snapshots` is also a route's name

LOG_BYTES = 64 * 1024


def guest(name: str) -> Guest:
    """The guest a URL names, with the CLI's name check."""
    return Guest(paths.check_name(name))


def start(name: str) -> dict:
    """`kvmrun start NAME`: the defined VM, or the profile file the guest last ran from."""
    return launch.start(profiles.restart_profile(name), wait_ready=False)


ACTIONS = {"start": start,
           "kill": lambda name: power.kill(guest(name)),
           "pause": lambda name: power.pause(guest(name)),
           "resume": lambda name: power.resume(guest(name)),
           "reset": lambda name: power.reset(guest(name))}


def status_of(e: KvmrunError) -> int:
    if e.exit_code == 2:                         # a bad profile, name or request
        return 400
    if isinstance(e, GuestError):
        return 409
    return 500


async def call(fn, *args, **kwargs) -> web.Response:
    """Run a library call off the event loop; its result or its error as JSON."""
    try:
        result = await asyncio.to_thread(fn, *args, **kwargs)
    except KvmrunError as e:
        return web.json_response({"error": str(e), "exit_code": e.exit_code},
                                 status=status_of(e))
    return web.json_response({"ok": True, "result": result})


class GuestRows:
    """The Guests page's rows: running guests (kvmrun list) and defined VMs, with host CPU%
    and RSS and any stop in progress. Defined VMs are re-read only when their directory
    changes."""

    def __init__(self):
        self.busy: dict[str, str] = {}           # name -> stage of a stop in progress
        self.closing = asyncio.Event()           # set when the server stops: streams end
        self._defined: list[dict] = []
        self._defined_key: tuple | None = None

    def _defined_vms(self) -> list[dict]:
        directory = paths.vm_dir()
        try:
            key = (directory.stat().st_mtime_ns, len(list(directory.iterdir())))
        except OSError:
            key = None
        if key != self._defined_key:
            self._defined = [vm.to_json() for vm in defined.list_defined()] if key else []
            self._defined_key = key
        return self._defined

    def rows(self) -> list[dict]:
        rows = {}
        for r in inspect.list_guests():
            if r["pid"]:
                r.update(proc.usage(r["pid"]))
            r["uptime"] = int(r["uptime"]) if r.get("uptime") is not None else None
            rows[r["name"]] = {**r, "defined": False}
        for vm in self._defined_vms():
            if vm["name"] in rows:
                rows[vm["name"]]["defined"] = True
            else:
                rows[vm["name"]] = {"name": vm["name"], "state": "defined", "pid": None,
                                    "memory_mib": vm.get("memory_mib"), "vcpus": vm.get("vcpus"),
                                    "uptime": None, "defined": True, "ended": None}
        for name, stage in self.busy.items():
            if name in rows:
                rows[name]["busy"] = stage
        return sorted(rows.values(), key=lambda r: r["name"])


async def event_stream(request: web.Request, rows: GuestRows) -> web.StreamResponse:
    """Server-sent events: the guest list whenever it changes (checked twice a second)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    last = None
    while not rows.closing.is_set():
        try:
            data = json.dumps(await asyncio.to_thread(rows.rows))
        except KvmrunError as e:
            data = json.dumps({"error": str(e)})
        if data != last:
            await resp.write(f"event: guests\ndata: {data}\n\n".encode())
            last = data
        try:
            await asyncio.wait_for(rows.closing.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    return resp


async def stop(name: str, rows: GuestRows) -> web.Response:
    """`kvmrun stop NAME`; the ladder's stage is shown in the guest's row meanwhile."""
    rows.busy[name] = "stopping"

    def progress(stage: str, message: str) -> None:
        rows.busy[name] = message
    try:
        return await call(lambda: power.stop(guest(name), progress=progress))
    finally:
        rows.busy.pop(name, None)


async def screenshot(name: str) -> web.Response:
    """QMP screendump as a PNG response."""
    with tempfile.TemporaryDirectory(prefix="kvmrun-ui-") as tmp:
        path = Path(tmp) / "screen.png"
        try:
            await asyncio.to_thread(power.screendump, guest(name), path)
            body = path.read_bytes()
        except KvmrunError as e:
            return web.json_response({"error": str(e)}, status=status_of(e))
    return web.Response(body=body, content_type="image/png", headers={
        "Content-Disposition": f'inline; filename="{name}-{int(time.time())}.png"'})


async def snapshot(name: str, body: dict) -> web.Response:
    """`kvmrun snapshot create|revert|delete NAME [SNAP]`; the list afterwards."""
    action = body.get("action")
    if action not in ("create", "revert", "delete"):
        raise web.HTTPBadRequest(text=f"no snapshot action {action!r}")
    return await call(snapops.snapshot, paths.check_name(name), action,
                      body.get("snap") or None)


def log_tail(name: str) -> str:
    """The last LOG_BYTES of the guest's serial.log, as text."""
    try:
        with open(guest(name).paths.serial_log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - LOG_BYTES))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def profile_and_argv(name: str) -> dict:
    """The defined profile as YAML (None if not defined) and the QEMU command line: the one
    the guest was started with, else the one it would get now."""
    launched = guest(name).launch_or_none()
    text = defined.export_text(defined.resolve(name)) if paths.is_defined(name) else None
    argv = launched.argv if launched is not None and launched.argv else None
    if argv is None and text is not None:
        argv = profiles.qemu_argv(defined.resolve(name))
    return {"yaml": text, "argv": argv}


def routes(rows: GuestRows) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/api/guests")
    async def guests(request):
        return await call(rows.rows)

    @r.get("/api/events")
    async def events(request):
        return await event_stream(request, rows)

    @r.get("/api/guests/{name}")
    async def status(request):
        return await call(lambda: inspect.status(guest(request.match_info["name"])))

    @r.post("/api/guests/{name}/{action}")
    async def action(request):
        name, what = request.match_info["name"], request.match_info["action"]
        if what == "screenshot":
            return await screenshot(name)
        if what == "snapshots":
            return await snapshot(name, await request.json())
        if what == "stop":
            return await stop(name, rows)
        if what not in ACTIONS:
            raise web.HTTPNotFound(text=f"no action {what!r}")
        return await call(ACTIONS[what], name)

    @r.get("/api/guests/{name}/snapshots")
    async def snapshots(request):
        return await call(lambda: snapops.snapshot(paths.check_name(
            request.match_info["name"]), "list"))

    @r.get("/api/guests/{name}/log")
    async def log(request):
        return await call(log_tail, request.match_info["name"])

    @r.get("/api/guests/{name}/profile")
    async def profile(request):
        return await call(profile_and_argv, request.match_info["name"])

    return r
