"""Named networks' definitions: <config dir>/networks/NAME.yaml, written by `kvmrun net
define` or with defaults on first use (a NAT network gets a free /24 that overlaps no other
kvmrun network and no host address)."""

from __future__ import annotations

import ipaddress
import re

from kvmrun.errors import NetworkError
from kvmrun.files import atomic_write
from kvmrun.net import links
from kvmrun.net.names import MAX_NET_NAME, definition_path, nat_bridge_name
from kvmrun.paths import NAME_RE, config_dir

def _yaml():
    import yaml                  # definitions are YAML; the supervisor never reads them
    return yaml


def load_definition(name: str) -> dict | None:
    try:
        data = _yaml().safe_load(definition_path(name).read_text())
    except FileNotFoundError:
        return None
    except Exception as err:      # a hand-edited file that does not parse
        raise NetworkError(f"{definition_path(name)}: cannot read the network "
                           f"definition: {err}") from err
    return data if isinstance(data, dict) else None


def definitions() -> list[dict]:
    directory = config_dir() / "networks"
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".yaml")
    except FileNotFoundError:
        return []
    out = []
    for path in files:
        found = load_definition(path.stem)
        if found:
            out.append(found)
    return out


def check_name(name: str) -> None:
    if not re.fullmatch(NAME_RE, name) or len(name) > MAX_NET_NAME:
        raise NetworkError(f"{name!r} is not a valid network name",
                           hint="letters and digits with . _ - between them, at most 32")


def overlap(subnet: ipaddress.IPv4Network, name: str, host: bool) -> str | None:
    """What `subnet` overlaps: another kvmrun network, or (host=True) a host address."""
    for other in definitions():
        if other.get("name") == name or not other.get("subnet"):
            continue
        if subnet.overlaps(ipaddress.IPv4Network(other["subnet"])):
            return f"kvmrun network {other['name']!r} ({other['subnet']})"
    if host:
        mine = nat_bridge_name(name)
        for ifname, net in links.host_networks():
            if ifname != mine and not net.is_loopback and subnet.overlaps(net):
                return f"{net} on host interface {ifname}"
    return None


def define(name: str, type_: str = "isolated", subnet: str | None = None,
           exist_ok: bool = False) -> dict:
    """Store a network definition; a NAT network gets a free subnet when none is given."""
    check_name(name)
    if type_ not in ("isolated", "nat"):
        raise NetworkError(f"network type {type_!r} cannot be defined: isolated or nat")
    existing = load_definition(name)
    if existing:
        if exist_ok and existing.get("type") == type_:
            return existing
        raise NetworkError(f"network {name!r} is already defined ({existing.get('type')}"
                           f"{', ' + existing['subnet'] if existing.get('subnet') else ''})",
                           hint=f"kvmrun net undefine {name} first")
    net = None
    if subnet:
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as err:
            raise NetworkError(f"--subnet {subnet!r}: {err}",
                               hint="write ADDRESS/PREFIX, e.g. 192.168.150.0/24") from None
        if net.prefixlen > 29:
            raise NetworkError(f"--subnet {subnet}: too small (a /29 at most)")
        clash = overlap(net, name, host=type_ == "nat")
        if clash:
            raise NetworkError(f"subnet {net} overlaps {clash}")
    elif type_ == "nat":
        for k in range(150, 250):
            candidate = ipaddress.IPv4Network(f"192.168.{k}.0/24")
            if not overlap(candidate, name, host=True):
                net = candidate
                break
        else:
            raise NetworkError("no free /24 in 192.168.150-249.0 for a NAT network",
                               hint="give one: kvmrun net define NAME --type nat --subnet ...")
    data = {"name": name, "type": type_}
    if net:
        data["subnet"] = str(net)
    if type_ == "nat":
        data["bridge"] = nat_bridge_name(name)
    path = definition_path(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, _yaml().safe_dump(data, sort_keys=False), mode=0o644)
    return data


def remove(name: str) -> None:
    """Remove a definition (kvmrun.ops.networks.undefine checks it may go)."""
    definition_path(name).unlink()


def require(name: str, type_: str) -> dict:
    """The definition of `name`, defined with defaults on first use; refuses a type clash."""
    data = load_definition(name) or define(name, type_, exist_ok=True)
    if data.get("type") != type_:
        raise NetworkError(f"network {name!r} is a {data.get('type')} network, not {type_}",
                           hint=f"use type: {data.get('type')}, or another name")
    return data
