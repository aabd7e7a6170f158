"""The `kvmrun net` verbs that look at or stop a named network as a whole."""

from __future__ import annotations

from kvmrun.errors import NetworkError
from kvmrun.net import defs
from kvmrun.net.isolated import hub_pid, hub_stop, members
from kvmrun.net.names import net_dir
from kvmrun.net.leases import leases
from kvmrun.net.nat import attached_taps, dnsmasq_pid, nat_running, nat_state, nat_stop

def undefine(name: str) -> None:
    """`kvmrun net undefine`: refused while a NAT network runs."""
    defs.check_name(name)
    data = defs.load_definition(name)
    if not data:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    if data.get("type") == "nat" and nat_running(name):
        raise NetworkError(f"NAT network {name!r} is running", hint=f"kvmrun net stop {name}")
    defs.remove(name)


def stop(name: str, force: bool = False) -> str:
    """`kvmrun net stop`: a NAT network goes down, an isolated network's hub stops."""
    defs.check_name(name)
    definition = defs.load_definition(name)
    if definition is None:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    if definition.get("type") == "nat":
        nat_stop(name, force)
    else:
        hub_stop(name, force)
    return definition.get("type", "isolated")


def status(name: str) -> dict:
    """What `kvmrun net status NAME` shows."""
    defs.check_name(name)
    definition = defs.load_definition(name)
    if not definition:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    info = {**definition}
    if definition.get("type") == "nat":
        state = nat_state(name)
        info.update(running=nat_running(name), gateway=state.get("gateway"),
                    range=state.get("range"), table=state.get("table"),
                    dnsmasq_pid=dnsmasq_pid(name, state) if state else None,
                    taps=attached_taps(name), leases=leases(name))
    else:
        directory = net_dir(name)
        info.update(running=hub_pid(directory) is not None, hub_pid=hub_pid(directory),
                    members=members(name))
    return info


def list_networks() -> list[dict]:
    rows = []
    for d in defs.definitions():
        name = d["name"]
        if d.get("type") == "nat":
            running = nat_running(name)
            users = len(attached_taps(name)) if running else 0
        else:
            running = hub_pid(net_dir(name)) is not None
            users = len(members(name))
        rows.append({"name": name, "type": d.get("type"), "subnet": d.get("subnet"),
                     "running": running, "nics": users})
    return rows
