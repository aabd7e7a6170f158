"""Guest networks: what the NICs of a profile need from the host, before and after QEMU.

kvmrun.compile only *names* things (a tap, a socket); this module does the I/O:

    check(profile)          before launch, no side effects: forward ports free (by binding),
                            bridge present, root where needed, helper configured
    setup(profile, paths)   under the guest's lock: taps on bridges, the hub of an isolated
                            network, a NAT network started on first use; recorded in
                            <run dir>/network.json
    teardown(paths)         removes what setup made (supervisor finish, failed start, a start
                            after a crash); safe to call twice

Network types (profile `network[].type`):
    user        QEMU's user-mode NAT (slirp): no root, forwards bound to 127.0.0.1
    isolated    a named network of guests only: each NIC is a unix datagram socket
                (`-netdev dgram`) wired to a small hub process (kvmrun.hub) per network;
                no root, no host interface, no IP traffic on the host
    bridge      a tap on an existing host bridge: made by kvmrun as root, otherwise through
                QEMU's setuid qemu-bridge-helper (`/etc/qemu/bridge.conf` must allow it)
    nat         a kvmrun-managed NAT network like libvirt's default (root): a bridge, dnsmasq
                for DHCP and DNS, an nftables table of its own for forwarding and masquerade

Named networks (isolated, nat) are defined in <config dir>/networks/NAME.yaml, explicitly
(`kvmrun net define`) or with defaults on first use; their runtime state lives in
<run dir>/.net/NAME/.

Light at import (standard library only): the supervisor imports it for teardown.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvmrun.errors import GuestError, HostError, KvmrunError
from kvmrun.paths import RunPaths, config_dir, run_dir

BRIDGE_CONF = "/etc/qemu/bridge.conf"
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"
NAT_DEFAULT_NAME = "default"
IFNAMSIZ = 15


class NetworkError(KvmrunError):
    """A network verb failed (bad name, not defined, overlapping subnet, in use)."""

    exit_code = 3


# ---------------------------------------------------------------- names (pure)

def tap_name(guest: str, index: int) -> str:
    """The tap kvmrun makes for NIC `index` of `guest`: stable, unique, ≤ 15 characters."""
    return "kv" + hashlib.sha256(f"kvmrun-tap:{guest}:{index}".encode()).hexdigest()[:12]


def nat_bridge_name(name: str) -> str:
    """The bridge of NAT network `name`: kvnat-NAME when it fits, else a hash."""
    plain = f"kvnat-{name}"
    if len(plain) <= IFNAMSIZ and all(c.isalnum() or c in "-_" for c in name):
        return plain
    return "kvnat-" + hashlib.sha256(name.encode()).hexdigest()[:9]


def nft_table(name: str) -> str:
    return "kvmrun_" + "".join(c if c.isalnum() else "_" for c in name)


def net_dir(name: str, base: Path | None = None) -> Path:
    """Runtime state of a named network (hub socket, ports, dnsmasq, leases)."""
    return (base or run_dir()) / ".net" / name


def port_socket(paths: RunPaths, index: int) -> Path:
    """The unix datagram socket QEMU binds for NIC `index` on an isolated network."""
    return paths.dir / f"net{index}.sock"


def hub_socket(paths: RunPaths, name: str) -> Path:
    return net_dir(name, paths.dir.parent) / "hub.sock"


def definition_path(name: str) -> Path:
    return config_dir() / "networks" / f"{name}.yaml"


# ---------------------------------------------------------------- small helpers

def _root() -> bool:
    return os.geteuid() == 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], check: bool = True, input: str | None = None
         ) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    except FileNotFoundError:
        package = {"ip": "iproute2", "nft": "nftables", "dnsmasq": "dnsmasq-base"}.get(
            argv[0], argv[0])
        raise HostError(f"{argv[0]} not found", hint=f"install it: apt-get install {package}")
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def is_bridge(name: str) -> bool:
    return os.path.isdir(f"/sys/class/net/{name}/bridge")


def _write_json(path: Path, value: dict) -> None:
    from kvmrun.runtime import atomic_write
    atomic_write(path, json.dumps(value, indent=1))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def _locked(directory: Path, timeout: float = 30.0) -> Iterator[None]:
    from kvmrun.runtime import flocked
    try:
        with flocked(directory / "lock", timeout):
            yield
    except TimeoutError:
        raise NetworkError(f"cannot lock {directory}: another kvmrun command holds it") \
            from None


def _starttime(pid: int) -> int | None:
    from kvmrun.runtime import proc_starttime
    return proc_starttime(pid)


def _alive(record: dict, marker: str) -> int | None:
    """The recorded pid if it is still that process and `marker` is one of its arguments."""
    from kvmrun.runtime import identified
    pid = record.get("pid")
    return pid if identified(pid, record.get("starttime"), marker) else None


# ---------------------------------------------------------------- definitions

def _yaml():
    import yaml
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


def _check_name(name: str) -> None:
    import re
    from kvmrun.profile import NET_NAME_RE
    if not re.fullmatch(NET_NAME_RE, name) or len(name) > 32:
        raise NetworkError(f"{name!r} is not a valid network name",
                           hint="letters and digits with . _ - between them, at most 32")


def _host_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) of the IPv4 addresses on this network namespace's interfaces."""
    proc = _ip("-j", "-4", "addr", "show", check=False)
    try:
        links = json.loads(proc.stdout or "[]")
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


def _overlap(subnet: ipaddress.IPv4Network, name: str, host: bool) -> str | None:
    """What `subnet` overlaps: another kvmrun network, or (host=True) a host address."""
    for other in definitions():
        if other.get("name") == name or not other.get("subnet"):
            continue
        if subnet.overlaps(ipaddress.IPv4Network(other["subnet"])):
            return f"kvmrun network {other['name']!r} ({other['subnet']})"
    if host:
        mine = nat_bridge_name(name)
        for ifname, net in _host_networks():
            if ifname != mine and not net.is_loopback and subnet.overlaps(net):
                return f"{net} on host interface {ifname}"
    return None


def define(name: str, type_: str = "isolated", subnet: str | None = None,
           exist_ok: bool = False) -> dict:
    """Store a network definition; a NAT network gets a free subnet when none is given."""
    _check_name(name)
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
        clash = _overlap(net, name, host=type_ == "nat")
        if clash:
            raise NetworkError(f"subnet {net} overlaps {clash}")
    elif type_ == "nat":
        for k in range(150, 250):
            candidate = ipaddress.IPv4Network(f"192.168.{k}.0/24")
            if not _overlap(candidate, name, host=True):
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
    from kvmrun.runtime import atomic_write
    atomic_write(path, _yaml().safe_dump(data, sort_keys=False), mode=0o644)
    return data


def undefine(name: str) -> None:
    _check_name(name)
    data = load_definition(name)
    if not data:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    if data.get("type") == "nat" and nat_running(name):
        raise NetworkError(f"NAT network {name!r} is running", hint=f"kvmrun net stop {name}")
    definition_path(name).unlink()


def require(name: str, type_: str) -> dict:
    """The definition of `name`, defined with defaults on first use; refuses a type clash."""
    data = load_definition(name) or define(name, type_, exist_ok=True)
    if data.get("type") != type_:
        raise NetworkError(f"network {name!r} is a {data.get('type')} network, not {type_}",
                           hint=f"use type: {data.get('type')}, or another name")
    return data


# ---------------------------------------------------------------- checks (no side effects)

def _location(profile, *path) -> str:
    return str(profile.location(*path))


def file_errors(profile) -> list:
    """ProfileErrors for files the NICs name: a TFTP directory, a boot file in it."""
    from kvmrun.errors import ProfileError
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


def check(profile) -> None:
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
            if not _root():
                raise HostError(f"{_location(profile, 'network', i)}: type: nat needs root "
                                "(kvmrun makes a bridge, taps, dnsmasq and nftables rules)",
                                hint="run as root, or use type: user (no root) or type: "
                                     "isolated (guests only, no root)")
            found = load_definition(net.name or NAT_DEFAULT_NAME)
            if found and found.get("type") != "nat":
                raise NetworkError(f"{_location(profile, 'network', i, 'name')}: network "
                                   f"{found['name']!r} is a {found.get('type')} network")
        elif net.type == "isolated":
            found = load_definition(net.name)
            if found and found.get("type") != "isolated":
                raise NetworkError(f"{_location(profile, 'network', i, 'name')}: network "
                                   f"{net.name!r} is a {found.get('type')} network")


def _check_port(profile, i: int, j: int, fwd: str) -> None:
    proto, addr, rest = fwd.split(":", 2)
    port = int(rest.split("-")[0])
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    where = _location(profile, "network", i, "forward", j)
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
    from kvmrun import runtime
    for name in runtime.guest_names():
        if name == me:
            continue
        guest = runtime.Guest(name)
        if guest.qemu_pid() is None:
            continue
        try:
            forwards = guest.read_launch().get("summary", {}).get("forwards", [])
        except (OSError, ValueError):
            continue
        for fwd in forwards:
            p, _, rest = fwd.split(":", 2)
            if p == proto and int(rest.split("-")[0]) == port:
                return name
    return None


def _check_bridge(profile, i: int, bridge: str) -> None:
    where = _location(profile, "network", i, "bridge")
    if not link_exists(bridge):
        raise HostError(f"{where}: bridge {bridge!r} does not exist",
                        hint=f"create it first (ip link add {bridge} type bridge), or use "
                             "type: nat for a kvmrun-managed network")
    if not is_bridge(bridge):
        raise HostError(f"{where}: {bridge!r} is a network interface but not a bridge")
    if _root():
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


# ---------------------------------------------------------------- setup / teardown

def describe(profile) -> list[dict]:
    """The profile's NICs as status shows them."""
    from kvmrun.compile import stable_mac
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


def record_path(paths: RunPaths) -> Path:
    return paths.dir / "network.json"


def setup(profile, paths: RunPaths) -> dict:
    """Make what the profile's NICs need; all or nothing. Recorded in network.json."""
    teardown(paths)                         # leftovers of a guest that ended uncleanly
    record: dict = {"nics": describe(profile), "taps": [], "ports": [], "sockets": []}
    try:
        for i, net in enumerate(profile.network):
            if net.type == "isolated":
                require(net.name, "isolated")
                link = _attach_port(paths, net.name, profile.name, i)
                record["ports"].append(str(link))
                record["sockets"].append(str(port_socket(paths, i)))
            elif net.type == "bridge" and _root():
                record["taps"].append(_make_tap(tap_name(profile.name, i), net.bridge))
            elif net.type == "nat":
                name = net.name or NAT_DEFAULT_NAME
                state = nat_start(name, quiet=True)
                record["taps"].append(_make_tap(tap_name(profile.name, i), state["bridge"]))
            _write_json(record_path(paths), record)
    except BaseException:
        _undo(record)
        _write_json(record_path(paths), {"nics": record["nics"]})
        raise
    _write_json(record_path(paths), record)
    return record


def teardown(paths: RunPaths) -> None:
    """Remove what setup made for this guest (taps, hub ports). Never raises."""
    record = _read_json(record_path(paths))
    if not any(record.get(k) for k in ("taps", "ports", "sockets")):
        return
    _undo(record)
    try:
        _write_json(record_path(paths), {"nics": record.get("nics", [])})
    except OSError:
        pass


def _undo(record: dict) -> None:
    for tap in record.get("taps", []):
        if link_exists(tap):
            subprocess.run(["ip", "link", "del", tap], capture_output=True)
    for path in record.get("ports", []) + record.get("sockets", []):
        try:
            os.unlink(path)
        except OSError:
            pass


def _make_tap(tap: str, bridge: str) -> str:
    if link_exists(tap):                    # a leftover of this very NIC (crash)
        _ip("link", "del", tap, check=False)
    if not is_bridge(bridge):
        raise HostError(f"bridge {bridge!r} does not exist")
    _ip("tuntap", "add", "dev", tap, "mode", "tap")
    try:
        _ip("link", "set", "dev", tap, "master", bridge)
        _ip("link", "set", "dev", tap, "up")
    except BaseException:
        _ip("link", "del", tap, check=False)
        raise
    return tap


def nic_status(paths: RunPaths) -> list[dict]:
    """The guest's NICs with, for NAT networks, the DHCP lease of each MAC."""
    nics = _read_json(record_path(paths)).get("nics", [])
    for nic in nics:
        if nic["type"] == "nat":
            lease = next((l for l in leases(nic["network"], paths.dir.parent)
                          if l["mac"] == nic["mac"]), None)
            if lease:
                nic["lease"] = lease
    return nics


# ---------------------------------------------------------------- isolated networks: the hub

def _attach_port(paths: RunPaths, name: str, guest: str, index: int) -> Path:
    directory = net_dir(name, paths.dir.parent)
    with _locked(directory):
        _ensure_hub(directory)
        ports = directory / "ports"
        ports.mkdir(exist_ok=True, mode=0o700)
        link = ports / f"{guest}.{index}"
        try:
            link.unlink()
        except FileNotFoundError:
            pass
        sock = port_socket(paths, index)
        try:
            sock.unlink()
        except FileNotFoundError:
            pass
        os.symlink(sock, link)
    return link


def hub_pid(directory: Path) -> int | None:
    return _alive(_read_json(directory / "hub.json"), str(directory))


def _ensure_hub(directory: Path) -> None:
    """Start the network's hub unless it runs (called under the network's lock)."""
    if hub_pid(directory) is not None and (directory / "hub.sock").exists():
        return
    log = open(directory / "hub.log", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "kvmrun.hub", str(directory)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True, close_fds=True)
    finally:
        log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostError(f"the hub of network {directory.name!r} exited ({proc.returncode})",
                            hint=f"see {directory / 'hub.log'}")
        if (directory / "hub.sock").exists() and hub_pid(directory) == proc.pid:
            return
        time.sleep(0.02)
    raise HostError(f"the hub of network {directory.name!r} did not start")


def members(name: str, base: Path | None = None) -> list[str]:
    """GUEST.INDEX of the NICs attached to a named network."""
    try:
        return sorted(p.name for p in (net_dir(name, base) / "ports").iterdir())
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- NAT networks

def nat_state(name: str, base: Path | None = None) -> dict:
    return _read_json(net_dir(name, base) / "nat.json")


def nat_running(name: str, base: Path | None = None) -> bool:
    state = nat_state(name, base)
    return bool(state) and link_exists(state.get("bridge", "")) and _dnsmasq_pid(
        name, state, base) is not None


def _dnsmasq_pid(name: str, state: dict, base: Path | None = None) -> int | None:
    return _alive(state.get("dnsmasq", {}),       # an argument of its own command line
                  f"--pid-file={net_dir(name, base) / 'dnsmasq.pid'}")


def _require_root(what: str) -> None:
    if not _root():
        raise HostError(f"{what} needs root (a bridge, dnsmasq and nftables rules)",
                        hint="run as root; without root use type: user or type: isolated")


def nat_start(name: str = NAT_DEFAULT_NAME, quiet: bool = False) -> dict:
    """Bring up NAT network `name` (defined with defaults on first use); idempotent."""
    _check_name(name)
    _require_root(f"NAT network {name!r}")
    definition = require(name, "nat")
    directory = net_dir(name)
    with _locked(directory):
        state = nat_state(name)
        if state and nat_running(name):
            return state
        _nat_down(name, state)               # half-made leftovers (crash, reboot)
        subnet = ipaddress.IPv4Network(definition["subnet"])
        clash = _overlap(subnet, name, host=True)
        if clash:
            raise NetworkError(f"NAT network {name!r}: subnet {subnet} overlaps {clash}",
                               hint=f"redefine it: kvmrun net undefine {name}; kvmrun net "
                                    f"define {name} --type nat --subnet ...")
        hosts = list(subnet.hosts())
        gateway, first, last = hosts[0], hosts[1], hosts[-1]
        bridge = definition.get("bridge") or nat_bridge_name(name)
        if link_exists(bridge):
            raise NetworkError(f"NAT network {name!r}: interface {bridge} already exists "
                               "and is not kvmrun's", hint=f"ip link del {bridge}")
        state = {"name": name, "bridge": bridge, "subnet": str(subnet),
                 "gateway": str(gateway), "range": [str(first), str(last)],
                 "table": nft_table(name), "started_at": time.time()}
        _write_json(directory / "nat.json", state)
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
            _ip("link", "set", "dev", bridge, "up")
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            _run(["nft", "-f", "-"], input=_nft_rules(state))
            state["dnsmasq"] = _start_dnsmasq(directory, state, subnet)
            _write_json(directory / "nat.json", state)
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
            "--user=root", "--group=root",
            f"--log-facility={directory / 'dnsmasq.log'}", "--log-dhcp",
            f"--conf-dir={directory / 'dnsmasq.d'}"]
    (directory / "dnsmasq.d").mkdir(exist_ok=True, mode=0o700)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except FileNotFoundError:
        raise HostError("dnsmasq not found", hint="install it: apt-get install dnsmasq-base")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostError(f"dnsmasq for NAT network {state['name']!r} failed: "
                            f"{proc.stderr.read().decode(errors='replace').strip()}")
        if (directory / "dnsmasq.pid").exists():
            break
        time.sleep(0.05)
    proc.stderr.close()
    return {"pid": proc.pid, "starttime": _starttime(proc.pid)}


def _nat_down(name: str, state: dict) -> None:
    """Remove whatever of a NAT network exists: dnsmasq, nft table, bridge, state."""
    directory = net_dir(name)
    pid = _dnsmasq_pid(name, state) if state else None
    if pid is not None:
        _terminate(pid)
    table = (state or {}).get("table") or nft_table(name)
    if _run(["nft", "list", "table", "ip", table], check=False).returncode == 0:
        _run(["nft", "delete", "table", "ip", table], check=False)
    bridge = (state or {}).get("bridge")
    if bridge and link_exists(bridge):
        _ip("link", "del", bridge, check=False)
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
    _check_name(name)
    _require_root(f"stopping NAT network {name!r}")
    directory = net_dir(name)
    if not directory.exists() and not nat_state(name):
        raise GuestError(f"NAT network {name!r} is not running")
    with _locked(directory):
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
        import shutil
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


def hub_stop(name: str, force: bool = False) -> None:
    """Stop the hub of isolated network `name` (it also goes by itself when idle)."""
    directory = net_dir(name)
    with _locked(directory):
        attached = members(name)
        if attached and not force:
            raise GuestError(f"network {name!r} is in use by {len(attached)} guest NIC(s) "
                             f"({', '.join(attached)})",
                             hint="stop those guests first, or --force")
        pid = hub_pid(directory)
        if pid is not None:
            _terminate(pid)
        for leaf in ("hub.sock", "hub.json"):
            try:
                (directory / leaf).unlink()
            except FileNotFoundError:
                pass


def stop(name: str, force: bool = False) -> str:
    """`kvmrun net stop`: a NAT network goes down, an isolated network's hub stops."""
    _check_name(name)
    definition = load_definition(name)
    if definition is None:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    if definition.get("type") == "nat":
        nat_stop(name, force)
    else:
        hub_stop(name, force)
    return definition.get("type", "isolated")


def _terminate(pid: int) -> None:
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not select.select([fd], [], [], 5)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], 5)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def leases(name: str, base: Path | None = None) -> list[dict]:
    """dnsmasq's leases of NAT network `name`: mac, ip, hostname, expiry."""
    try:
        text = (net_dir(name, base) / "leases").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append({"mac": parts[1].lower(), "ip": parts[2],
                        "hostname": None if parts[3] == "*" else parts[3],
                        "expires": int(parts[0]) if parts[0].isascii() and parts[0].isdigit() else None})
    return out


def status(name: str) -> dict:
    """What `kvmrun net status NAME` shows."""
    _check_name(name)
    definition = load_definition(name)
    if not definition:
        raise NetworkError(f"no network named {name!r} is defined", hint="kvmrun net list")
    info = {**definition}
    if definition.get("type") == "nat":
        state = nat_state(name)
        info.update(running=nat_running(name), gateway=state.get("gateway"),
                    range=state.get("range"), table=state.get("table"),
                    dnsmasq_pid=_dnsmasq_pid(name, state) if state else None,
                    taps=attached_taps(name), leases=leases(name))
    else:
        directory = net_dir(name)
        info.update(running=hub_pid(directory) is not None, hub_pid=hub_pid(directory),
                    members=members(name))
    return info


def list_networks() -> list[dict]:
    rows = []
    for d in definitions():
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
