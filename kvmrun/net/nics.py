"""A guest's NICs on the host, before and after QEMU:

    check(profile)          (kvmrun.net.checks) before launch, no side effects
    setup(profile, paths)   under the guest's lock: taps on bridges, the hub port of an
                            isolated network, a NAT network started on first use; recorded
                            in <run dir>/network.json (kvmrun.guest.netrecord)
    attach(nics, guest, paths)  the same from `describe`'s list (a migration target's)
    teardown(paths)         removes what setup made (kvmrun.guest.netrecord.teardown: the
                            supervisor calls it when its guest ends); safe to call twice

Network types (profile `network[].type`):
    user        QEMU's user-mode NAT (slirp): no root, forwards bound to 127.0.0.1
    isolated    a named network of guests only (kvmrun.net.isolated): no root
    bridge      a tap on an existing host bridge: made by kvmrun as root, otherwise through
                QEMU's setuid qemu-bridge-helper (`/etc/qemu/bridge.conf` must allow it)
    nat         a kvmrun-managed NAT network like libvirt's default (kvmrun.net.nat, root)"""

from __future__ import annotations

from kvmrun.guest import netrecord
from kvmrun.guest.netrecord import teardown
from kvmrun.net.names import NAT_DEFAULT_NAME, port_socket, stable_mac, tap_name
from kvmrun.paths import RunPaths
from kvmrun.profile import Profile

# The backends (kvmrun.net.links, .defs, .isolated, .nat: subprocess, socket, ipaddress) are
# imported by the NIC types that use them: user-mode networking needs none of them.


def _root() -> bool:
    from kvmrun.net import links
    return links.is_root()


def describe(profile: Profile) -> list[dict]:
    """The profile's NICs as status shows them."""
    nics = []
    for i, net in enumerate(profile.network):
        if net.type == "none":
            continue
        nic = {"index": i, "type": net.type, "mac": (net.mac or stable_mac(profile.name, i)
                                                     ).lower(),
               "model": net.model}
        if net.type == "user":
            nic["forwards"] = list(net.forward)
            nic["net"] = net.net or "10.0.2.0/24"
        elif net.type in ("isolated", "nat"):
            nic["network"] = net.name or NAT_DEFAULT_NAME
        elif net.type == "bridge":
            nic["bridge"] = net.bridge
        if net.type == "nat" or (net.type == "bridge" and _root()):
            nic["tap"] = tap_name(profile.name, i)
        nics.append(nic)
    return nics


def setup(profile: Profile, paths: RunPaths) -> dict:
    """Make what the profile's NICs need; all or nothing. Recorded in network.json."""
    return attach(describe(profile), profile.name, paths)


def attach(nics: list[dict], guest: str, paths: RunPaths) -> dict:
    """Make what the NICs `describe` gave need (a migration target gets the source's list);
    all or nothing. Recorded in network.json."""
    teardown(paths)                         # leftovers of a guest that ended uncleanly
    record: dict = {"nics": nics, "taps": [], "ports": [], "sockets": []}
    try:
        for nic in nics:
            i, kind = nic["index"], nic["type"]
            if kind == "isolated":
                from kvmrun.net import defs
                from kvmrun.net.isolated import attach_port
                defs.require(nic["network"], "isolated")
                link = attach_port(paths, nic["network"], guest, i)
                record["ports"].append(str(link))
                record["sockets"].append(str(port_socket(paths, i)))
            elif kind == "bridge" and _root():
                from kvmrun.net import links
                record["taps"].append(links.make_tap(tap_name(guest, i), nic["bridge"]))
            elif kind == "nat":
                from kvmrun.net import links
                from kvmrun.net.nat import nat_start
                state = nat_start(nic.get("network") or NAT_DEFAULT_NAME, quiet=True)
                record["taps"].append(links.make_tap(tap_name(guest, i), state["bridge"]))
            netrecord.write(paths, record)
    except BaseException:
        netrecord.undo(record)
        netrecord.write(paths, {"nics": record["nics"]})
        raise
    netrecord.write(paths, record)
    return record


__all__ = ["attach", "describe", "setup", "teardown"]   # teardown: kvmrun.guest.netrecord's
