"""What a profile's NICs need from this host, checked before anything is made: TFTP files,
forwarded host ports free (by binding them), the bridge, root, QEMU's bridge helper."""

from __future__ import annotations

import os
from pathlib import Path

from kvmrun.errors import HostError, NetworkError, ProfileError
from kvmrun.net.names import NAT_DEFAULT_NAME
from kvmrun.net.ports import check_forward
from kvmrun.profile import Profile

# kvmrun.net.links and .defs (subprocess, ipaddress) are imported by the NIC types that use
# them: a start with user-mode or no networking does not pay for them (~8 ms).

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
            from kvmrun.net import defs, links
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
            from kvmrun.net import defs
            found = defs.load_definition(net.name)
            if found and found.get("type") != "isolated":
                raise NetworkError(f"{located(profile, 'network', i, 'name')}: network "
                                   f"{net.name!r} is a {found.get('type')} network")


def _check_port(profile: Profile, i: int, j: int, fwd: str) -> None:
    check_forward(located(profile, "network", i, "forward", j), profile.name, fwd)


def _check_bridge(profile: Profile, i: int, bridge: str) -> None:
    from kvmrun.net import links
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
