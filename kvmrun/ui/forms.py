"""The API of the New VM form and of the Networks and Storage pages.

The form calls `kvmrun.ops.new.new_profile` (as `kvmrun new` does) for the profile and
`kvmrun cmdline`'s compile (kvmrun.ops.profiles.qemu_argv) for the command line; the user
may edit the YAML, which is then validated by `kvmrun.profile.from_mapping`, checked as
`kvmrun validate` checks, and defined (and started) as `kvmrun new` does."""

from __future__ import annotations

import yaml
from aiohttp import web

from kvmrun.errors import Location, ProfileError
from kvmrun.net import defs, nat
from kvmrun.ops import networks as netops        # route handlers are named networks, pools
from kvmrun.ops import new, osinfo, profiles
from kvmrun.qemu import checks
from kvmrun.storage import pools as poolstore
from kvmrun.ui.api import call

FORM_KEYS = ("os_id", "cdrom", "kernel", "initrd", "append", "import_disk", "pxe", "memory",
             "cpus", "disk", "pool", "network", "uefi", "display")
SOURCES = {"cdrom": ("cdrom",), "kernel": ("kernel", "initrd", "append"),
           "import": ("import_disk",)}


def _os_search(text: str) -> list[dict]:
    if not osinfo.available():
        return []
    return [{**e.to_json(), "suggested": new.suggested(e)}
            for e in osinfo.search(text)[:50]]


def _preview(form: dict) -> dict:
    """new_profile from the form's fields, then its YAML and command line."""
    name = (form.get("name") or "").strip()
    kwargs = {k: (form.get(k) if form.get(k) not in ("", None) else None) for k in FORM_KEYS}
    kwargs["uefi"] = bool(kwargs["uefi"])
    if kwargs["cpus"] is not None:
        kwargs["cpus"] = int(kwargs["cpus"])
    mode = form.get("mode") or "none"
    for source, keys in SOURCES.items():           # only the chosen mode's fields count
        if source != mode:
            kwargs.update(dict.fromkeys(keys))
    kwargs["pxe"] = mode == "pxe"
    data = new.new_profile(name, **kwargs)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return {"yaml": text, "argv": profiles.qemu_argv(new.validate(data))}


def _from_yaml(text: str):
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(Location("the edited profile", line=mark.line + 1 if mark else None),
                           f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ProfileError(Location("the edited profile"), "a profile must be a mapping")
    return data, new.validate(data)


def _validate(text: str) -> dict:
    data, prof = _from_yaml(text)
    checks.check(prof)
    return {"argv": profiles.qemu_argv(prof)}


def _define(text: str, start: bool) -> dict:
    data, prof = _from_yaml(text)
    checks.check(prof)
    return new.define(data, start=start)


def _pools() -> list[dict]:
    """`kvmrun pool list` with each pool's volumes (size, which guest uses them)."""
    return [{**pool, "volumes": poolstore.volumes(pool["name"])}
            for pool in (poolstore.usage(name) for name in poolstore.names())]


def routes() -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/api/os")
    async def os_search(request):
        return await call(_os_search, request.query.get("q", ""))

    @r.post("/api/new/preview")
    async def preview(request):
        return await call(_preview, await request.json())

    @r.post("/api/new/validate")
    async def validate(request):
        return await call(_validate, (await request.json()).get("yaml", ""))

    @r.post("/api/new/define")
    async def define(request):
        body = await request.json()
        return await call(_define, body.get("yaml", ""), bool(body.get("start")))

    @r.get("/api/networks")
    async def networks(request):
        return await call(netops.list_networks)

    @r.post("/api/networks")
    async def define_network(request):
        body = await request.json()
        return await call(defs.define, body.get("name", ""),
                          body.get("type") or "isolated", body.get("subnet") or None)

    @r.post("/api/networks/{name}/{action}")
    async def network_action(request):
        name, action = request.match_info["name"], request.match_info["action"]
        if action == "start":
            return await call(nat.nat_start, name)
        if action == "stop":
            return await call(netops.stop, name)
        raise web.HTTPNotFound(text=f"no action {action!r}")

    @r.get("/api/pools")
    async def pools(request):
        return await call(_pools)

    @r.post("/api/pools")
    async def define_pool(request):
        body = await request.json()
        return await call(poolstore.define, body.get("name", ""), body.get("path", ""))

    return r
