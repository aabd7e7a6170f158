"""What a profile's NICs need from this host, checked before anything is made: TFTP files,
forwarded host ports free (by binding them), the bridge, root, QEMU's bridge helper."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from kvmrun.errors import HostError, NetworkError, ProfileError
from kvmrun.guest.rundir import live_launches
from kvmrun.net import defs, links
from kvmrun.net.names import NAT_DEFAULT_NAME
from kvmrun.profile import Profile

BRIDGE_CONF = "/etc/qemu/bridge.conf"
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"


def located(profile: Profile, *path) -> str:
    return str(profile.location(*path))


def file_errors(profile: Profile) -> list:
    """ProfileErrors for files the NICs name: a TFTP directory, a boot file in it."""
    errors = []
    for i, net in enumerate(profile.network):
        if net.tftp and not os.path.isdir(net.tftp):
            errors.append(ProfileError(profile.location("network", i, "tftp"),
                                       f"TFTP directory {net.tftp!r} not found"))
        elif (net.tftp and net.bootfile and "://" not in net.bootfile
                and not os.path.isfile(os.path.join(net.tftp, net.bootfile.lstrip("/")))):
            errors.append(ProfileError(profile.location("network", i, "bootfile"),
                                       f"boot file {net.bootfile!r} not found in the TFTP "
                                       f"directory {net.tftp!r}",
                                       hint="bootfile names a file relative to the tftp "
                                            "directory, or a URL"))
    return errors


def check(profile: Profile) -> None:
    """Everything about the profile's NICs that can be wrong on this host, before anything
    is made: missing TFTP files, forward ports in use, a missing bridge, root, the bridge
    helper."""
    for error in file_errors(profile):
        raise error
    for i, net in enumerate(profile.network):
        for j, fwd in enumerate(net.forward):
            _check_port(profile, i, j, fwd)
        if net.type == "bridge":
            _check_bridge(profile, i, net.bridge)
        elif net.type == "nat":
            if not links.is_root():
                raise HostError(f"{located(profile, 'network', i)}: type: nat needs root "
                                "(kvmrun makes a bridge, taps, dnsmasq and nftables rules)",
                                hint="run as root, or use type: user (no root) or type: "
                                     "isolated (guests only, no root)")
            found = defs.load_definition(net.name or NAT_DEFAULT_NAME)
            if found and found.get("type") != "nat":
                raise NetworkError(f"{located(profile, 'network', i, 'name')}: network "
                                   f"{found['name']!r} is a {found.get('type')} network")
        elif net.type == "isolated":
            found = defs.load_definition(net.name)
            if found and found.get("type") != "isolated":
                raise NetworkError(f"{located(profile, 'network', i, 'name')}: network "
                                   f"{net.name!r} is a {found.get('type')} network")


def _check_port(profile: Profile, i: int, j: int, fwd: str) -> None:
    proto, addr, rest = fwd.split(":", 2)
    port = int(rest.split("-")[0])
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    where = located(profile, "network", i, "forward", j)
    with socket.socket(socket.AF_INET, kind) as s:
        # as QEMU's own listening socket: a port only in TIME_WAIT counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr or "0.0.0.0", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                owner = _forward_owner(profile.name, proto, port)
                raise HostError(f"{where}: host port {addr or '*'}:{port}/{proto} is already "
                                f"in use{' by guest ' + repr(owner) if owner else ''}",
                                hint="choose another host port" + (
                                    "" if owner else f", or see what holds it: ss -"
                                    f"{'t' if proto == 'tcp' else 'u'}lnp 'sport = :{port}'")
                                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise HostError(f"{where}: {addr} is not an address of this host") from None
            if err.errno == errno.EACCES:
                raise HostError(f"{where}: host port {port} is privileged (below 1024)",
                                hint="choose a port of 1024 or more, or run as root") from None
            raise HostError(f"{where}: cannot bind {addr}:{port}/{proto}: "
                            f"{err.strerror}") from None


def _forward_owner(me: str, proto: str, port: int) -> str | None:
    """The running kvmrun guest whose forward holds this port, if any."""
    for name, launch in live_launches(skip=me):
        for fwd in launch.forwards:
            p, _, rest = fwd.split(":", 2)
            if p == proto and int(rest.split("-")[0]) == port:
                return name
    return None


def _check_bridge(profile: Profile, i: int, bridge: str) -> None:
    where = located(profile, "network", i, "bridge")
    if not links.link_exists(bridge):
        raise HostError(f"{where}: bridge {bridge!r} does not exist",
                        hint=f"create it first (ip link add {bridge} type bridge), or use "
                             "type: nat for a kvmrun-managed network")
    if not links.is_bridge(bridge):
        raise HostError(f"{where}: {bridge!r} is a network interface but not a bridge")
    if links.is_root():
        return
    if not os.path.exists(BRIDGE_HELPER):
        raise HostError(f"{where}: a bridged NIC without root needs {BRIDGE_HELPER}",
                        hint="install qemu-system-common, or run as root")
    if not _bridge_allowed(bridge):
        raise HostError(f"{where}: QEMU's bridge helper does not allow bridge {bridge!r}",
                        hint=f"as root: mkdir -p /etc/qemu && echo 'allow {bridge}' >> "
                             f"{BRIDGE_CONF} && chmod 0644 {BRIDGE_CONF} (and the helper "
                             f"must be setuid: chmod u+s {BRIDGE_HELPER}); or run as root")
    if not os.stat(BRIDGE_HELPER).st_mode & 0o4000:
        raise HostError(f"{where}: {BRIDGE_HELPER} is not setuid root, so it cannot add a "
                        "tap to the bridge", hint=f"as root: chmod u+s {BRIDGE_HELPER}")


def _bridge_allowed(bridge: str, conf: str = BRIDGE_CONF, depth: int = 0) -> bool:
    """Whether qemu-bridge-helper's ACL (allow/deny/include lines) lets `bridge` through."""
    try:
        lines = Path(conf).read_text().splitlines()
    except OSError:
        return False
    allowed = False
    for line in lines:
        words = line.split("#")[0].split()
        if len(words) != 2:
            continue
        verb, arg = words
        if verb == "include" and depth < 5:
            allowed = allowed or _bridge_allowed(bridge, arg, depth + 1)
        elif verb == "allow" and arg in (bridge, "all"):
            allowed = True
        elif verb == "deny" and arg in (bridge, "all"):
            return False
    return allowed
