"""Host network interfaces through iproute2: links, bridges, taps, addresses. Root only
where it changes something (kvmrun makes taps and NAT bridges as root)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

from kvmrun import proc
from kvmrun.errors import HostError

def is_root() -> bool:
    return os.geteuid() == 0


def run(argv: list[str], check: bool = True, input: str | None = None
        ) -> subprocess.CompletedProcess:
    return proc.run(argv, check=check, input=input, timeout=60)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], check=check)


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def is_bridge(name: str) -> bool:
    return os.path.isdir(f"/sys/class/net/{name}/bridge")


def host_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) of the IPv4 addresses on this network namespace's interfaces."""
    child = ip("-j", "-4", "addr", "show", check=False)
    try:
        links = json.loads(child.stdout or "[]")
    except ValueError:
        return []
    out = []
    for link in links:
        for addr in link.get("addr_info", []):
            try:
                out.append((link.get("ifname", "?"), ipaddress.IPv4Network(
                    f"{addr['local']}/{addr['prefixlen']}", strict=False)))
            except (KeyError, ValueError):
                continue
    return out


def make_tap(tap: str, bridge: str) -> str:
    if link_exists(tap):                    # a leftover of this very NIC (crash)
        ip("link", "del", tap, check=False)
    if not is_bridge(bridge):
        raise HostError(f"bridge {bridge!r} does not exist")
    ip("tuntap", "add", "dev", tap, "mode", "tap")
    try:
        ip("link", "set", "dev", tap, "master", bridge)
        ip("link", "set", "dev", tap, "up")
    except BaseException:
        ip("link", "del", tap, check=False)
        raise
    return tap
