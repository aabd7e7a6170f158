"""Names of network things, pure: taps, bridges, nftables tables, sockets, MAC addresses.

The compiler names what a NIC uses (a tap, the hub's socket); kvmrun.net makes them. Both take
the names from here, so they always agree.
"""

from __future__ import annotations

from pathlib import Path

from kvmrun.files import sha256     # not hashlib's: it loads OpenSSL (~4 ms of a start)
from kvmrun.paths import RunPaths, config_dir, run_dir

NAT_DEFAULT_NAME = "default"
IFNAMSIZ = 15
MAX_NET_NAME = 32


def stable_mac(name: str, index: int) -> str:
    """The MAC of NIC `index` of VM `name` when the profile gives none: stable across
    restarts and hosts, in QEMU's locally administered 52:54:00 range."""
    digest = sha256(f"kvmrun:{name}:{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def tap_name(guest: str, index: int) -> str:
    """The tap kvmrun makes for NIC `index` of `guest`: stable, unique, ≤ 15 characters."""
    return "kv" + sha256(f"kvmrun-tap:{guest}:{index}".encode()).hexdigest()[:12]


def nat_bridge_name(name: str) -> str:
    """The bridge of NAT network `name`: kvnat-NAME when it fits, else a hash."""
    plain = f"kvnat-{name}"
    if len(plain) <= IFNAMSIZ and all(c.isalnum() or c in "-_" for c in name):
        return plain
    return "kvnat-" + sha256(name.encode()).hexdigest()[:9]


def nft_table(name: str) -> str:
    return "kvmrun_" + "".join(c if c.isalnum() else "_" for c in name)


def net_dir(name: str, base: Path | None = None) -> Path:
    """Runtime state of a named network (hub socket, ports, dnsmasq, leases)."""
    return (base or run_dir()) / ".net" / name


def port_socket(paths: RunPaths, index: int) -> Path:
    """The unix datagram socket QEMU binds for NIC `index` on an isolated network."""
    return paths.port_socket(index)


def hub_socket(paths: RunPaths, name: str) -> Path:
    return net_dir(name, paths.dir.parent) / "hub.sock"


def definition_path(name: str) -> Path:
    return config_dir() / "networks" / f"{name}.yaml"
