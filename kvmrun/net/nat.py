"""NAT networks (root), like libvirt's default network: a bridge, dnsmasq for DHCP and DNS,
and an nftables table of their own for forwarding and masquerade. Runtime state in
<run dir>/.net/NAME/nat.json; leases from dnsmasq's lease file."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from pathlib import Path

from kvmrun import files, proc
from kvmrun.errors import GuestError, HostError, NetworkError
from kvmrun.net import defs, links
from kvmrun.net.isolated import alive, locked, read_record
from kvmrun.net.names import NAT_DEFAULT_NAME, net_dir, nft_table, nat_bridge_name

def nat_state(name: str, base: Path | None = None) -> dict:
    return read_record(net_dir(name, base) / "nat.json")


def nat_running(name: str, base: Path | None = None) -> bool:
    state = nat_state(name, base)
    return bool(state) and links.link_exists(state.get("bridge", "")) and dnsmasq_pid(
        name, state, base) is not None


def dnsmasq_pid(name: str, state: dict, base: Path | None = None) -> int | None:
    return alive(state.get("dnsmasq", {}),       # an argument of its own command line
                  f"--pid-file={net_dir(name, base) / 'dnsmasq.pid'}")


def _require_root(what: str) -> None:
    if not links.is_root():
        raise HostError(f"{what} needs root (a bridge, dnsmasq and nftables rules)",
                        hint="run as root; without root use type: user or type: isolated")


def nat_start(name: str = NAT_DEFAULT_NAME, quiet: bool = False) -> dict:
    """Bring up NAT network `name` (defined with defaults on first use); idempotent."""
    defs.check_name(name)
    _require_root(f"NAT network {name!r}")
    definition = defs.require(name, "nat")
    directory = net_dir(name)
    with locked(directory):
        state = nat_state(name)
        if state and nat_running(name):
            return state
        _nat_down(name, state)               # half-made leftovers (crash, reboot)
        subnet = ipaddress.IPv4Network(definition["subnet"])
        clash = defs.overlap(subnet, name, host=True)
        if clash:
            raise NetworkError(f"NAT network {name!r}: subnet {subnet} overlaps {clash}",
                               hint=f"redefine it: kvmrun net undefine {name}; kvmrun net "
                                    f"define {name} --type nat --subnet ...")
        hosts = list(subnet.hosts())
        gateway, first, last = hosts[0], hosts[1], hosts[-1]
        bridge = definition.get("bridge") or nat_bridge_name(name)
        if links.link_exists(bridge):
            raise NetworkError(f"NAT network {name!r}: interface {bridge} already exists "
                               "and is not kvmrun's", hint=f"ip link del {bridge}")
        state = {"name": name, "bridge": bridge, "subnet": str(subnet),
                 "gateway": str(gateway), "range": [str(first), str(last)],
                 "table": nft_table(name), "started_at": time.time()}
        files.write_json(directory / "nat.json", state)
        try:
            links.ip("link", "add", bridge, "type", "bridge")
            links.ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
            links.ip("link", "set", "dev", bridge, "up")
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            links.run(["nft", "-f", "-"], input=_nft_rules(state))
            state["dnsmasq"] = _start_dnsmasq(directory, state, subnet)
            files.write_json(directory / "nat.json", state)
        except BaseException:
            _nat_down(name, state)
            raise
    return state


def _nft_rules(state: dict) -> str:
    br, net, table = state["bridge"], state["subnet"], state["table"]
    return f"""table ip {table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{br}" ip saddr {net} accept
        oifname "{br}" ip daddr {net} ct state established,related accept
        iifname "{br}" drop
        oifname "{br}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {net} ip daddr 224.0.0.0/24 return
        ip saddr {net} ip daddr 255.255.255.255 return
        ip saddr {net} ip daddr != {net} masquerade
    }}
}}
"""


def _dnsmasq_user() -> list[str]:
    """dnsmasq drops root once its sockets, lease and log files are open: to
    KVMRUN_DNSMASQ_USER, else `nobody` (with that user's group)."""
    import grp
    import pwd
    name = os.environ.get("KVMRUN_DNSMASQ_USER") or "nobody"
    try:
        entry = pwd.getpwnam(name)
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        raise HostError(f"no user {name!r} for dnsmasq to run as",
                        hint="set KVMRUN_DNSMASQ_USER to an unprivileged user") from None
    return [f"--user={name}", f"--group={group}"]


def _start_dnsmasq(directory: Path, state: dict, subnet: ipaddress.IPv4Network) -> dict:
    leases_file = directory / "leases"
    leases_file.touch(mode=0o644)
    first, last = state["range"]
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--strict-order",
            "--bind-interfaces", "--except-interface=lo", f"--interface={state['bridge']}",
            f"--listen-address={state['gateway']}", "--dhcp-authoritative",
            "--dhcp-no-override", f"--dhcp-range={first},{last},{subnet.netmask},1h",
            f"--dhcp-lease-max={subnet.num_addresses}",
            f"--dhcp-leasefile={leases_file}", f"--pid-file={directory / 'dnsmasq.pid'}",
            *_dnsmasq_user(),
            f"--log-facility={directory / 'dnsmasq.log'}", "--log-dhcp",
            f"--conf-dir={directory / 'dnsmasq.d'}"]
    (directory / "dnsmasq.d").mkdir(exist_ok=True, mode=0o700)
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except FileNotFoundError:
        raise HostError("dnsmasq not found", hint="install it: apt-get install dnsmasq-base")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise HostError(f"dnsmasq for NAT network {state['name']!r} failed: "
                            f"{child.stderr.read().decode(errors='replace').strip()}")
        if (directory / "dnsmasq.pid").exists():
            break
        time.sleep(0.05)
    child.stderr.close()
    return {"pid": child.pid, "starttime": proc.starttime(child.pid)}


def _nat_down(name: str, state: dict) -> None:
    """Remove whatever of a NAT network exists: dnsmasq, nft table, bridge, state."""
    directory = net_dir(name)
    pid = dnsmasq_pid(name, state) if state else None
    if pid is not None:
        proc.terminate(pid)
    table = (state or {}).get("table") or nft_table(name)
    if links.run(["nft", "list", "table", "ip", table], check=False).returncode == 0:
        links.run(["nft", "delete", "table", "ip", table], check=False)
    bridge = (state or {}).get("bridge")
    if bridge and links.link_exists(bridge):
        links.ip("link", "del", bridge, check=False)
    for leaf in ("nat.json", "dnsmasq.pid"):
        try:
            (directory / leaf).unlink()
        except FileNotFoundError:
            pass


def attached_taps(name: str, base: Path | None = None) -> list[str]:
    bridge = nat_state(name, base).get("bridge")
    try:
        return sorted(os.listdir(f"/sys/class/net/{bridge}/brif")) if bridge else []
    except FileNotFoundError:
        return []


def nat_stop(name: str, force: bool = False) -> None:
    defs.check_name(name)
    _require_root(f"stopping NAT network {name!r}")
    directory = net_dir(name)
    if not directory.exists() and not nat_state(name):
        raise GuestError(f"NAT network {name!r} is not running")
    with locked(directory):
        taps = attached_taps(name)
        if taps and not force:
            raise GuestError(f"NAT network {name!r} is in use by {len(taps)} guest NIC(s) "
                             f"({', '.join(taps)})", hint="stop those guests first, or "
                                                          "--force")
        _nat_down(name, nat_state(name))
        for leaf in ("leases", "dnsmasq.log"):
            try:
                (directory / leaf).unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(directory / "dnsmasq.d", ignore_errors=True)
    for leftover in ("lock",):
        try:
            (directory / leftover).unlink()
        except FileNotFoundError:
            pass
    try:
        directory.rmdir()
    except OSError:
        pass
