"""Networks without a guest: profile keys and their pinned messages, the netdev each type
compiles to, the host checks (ports in use by binding, bridges, root, the bridge helper's
ACL), named-network definitions (overlaps refused), and the isolated network's hub switching
real frames between unix sockets."""

from __future__ import annotations

import json
import os
import socket
import textwrap
from pathlib import Path

import pytest

from kvmrun.net import checks as netchecks, defs, isolated, links, names, nat, nics
from kvmrun.net.leases import leases
from kvmrun.ops import networks
from kvmrun.ops.inspect import nic_status
from kvmrun.guest.rundir import Guest
from kvmrun.qemu.compile import HostFacts, compile, netdev_parts, stable_mac
from kvmrun.errors import HostError, ProfileError
from kvmrun.net.hub import Hub
from kvmrun.errors import NetworkError
from kvmrun.paths import RunPaths
from kvmrun.profile import load


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)


def profile(tmp_path: Path, text: str, name: str = "vm"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\narch: x86_64\n" + textwrap.dedent(text))
    return load(path.name)                       # the cwd: messages name vm.yaml


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ProfileError) as err:
        profile(tmp_path, text)
    return str(err.value).splitlines()


PATHS = RunPaths(Path("/run/kvmrun/vm"))


# ---------------------------------------------------------------- profile keys

def test_user_options_are_checked(tmp_path):
    assert errors_of(tmp_path, """\
        network:
          - net: 10.0.2.0/33
          - net: 10.1.0.0/30
          - dhcpstart: 10.0.3.15
          - net: 10.0.2.1/24
        """) == [
        "vm.yaml:4: network[0].net: '10.0.2.0/33' is not an IPv4 network: '33' is not a "
        "valid netmask",
        "  hint: write ADDRESS/PREFIX, e.g. 10.0.2.0/24",
        "vm.yaml:5: network[1].net: '10.1.0.0/30' is too small (a /29 at most)",
        "vm.yaml:7: network[3].net: '10.0.2.1/24' is not an IPv4 network: 10.0.2.1/24 has "
        "host bits set",
        "  hint: write ADDRESS/PREFIX, e.g. 10.0.2.0/24"]
    assert errors_of(tmp_path, "network:\n  - dhcpstart: 10.0.3.15\n") == [
        "vm.yaml:4: network[0].dhcpstart: 10.0.3.15 is not in the guest network 10.0.2.0/24"]


def test_keys_of_one_type_and_names(tmp_path):
    assert errors_of(tmp_path, """\
        network:
          - type: isolated
          - type: bridge
            forward: 2222:22
          - type: nat
            restrict: true
            bridge: br0
          - type: user
            name: lab1
        """) == [
        "vm.yaml:4: network[0]: type: isolated needs the network's name",
        "  hint: name: lab1 (guests with the same name share the network)",
        "vm.yaml:5: network[1]: type: bridge needs the host bridge's name",
        "  hint: bridge: br0",
        "vm.yaml:6: network[1].forward: forward is for type: user, not type: bridge",
        "vm.yaml:8: network[2].restrict: restrict is for type: user, not type: nat",
        "vm.yaml:9: network[2].bridge: bridge is for type: bridge, not type: nat",
        "vm.yaml:11: network[3].name: name is for type: isolated or nat, not type: user"]


def test_a_host_port_forwarded_twice(tmp_path):
    assert errors_of(tmp_path, """\
        network:
          - forward: [8080:80, 'udp::8080-:80']
          - forward: 'tcp:127.0.0.1:8080-:22'
        """) == ["vm.yaml:5: network[1].forward[0]: host port 8080/tcp on 127.0.0.1 is "
                 "forwarded twice"]


# ---------------------------------------------------------------- compile

def test_netdev_of_each_type(tmp_path):
    p = profile(tmp_path, """\
        network:
          - {type: user, restrict: true, net: 10.9.0.0/24, dhcpstart: 10.9.0.9,
             tftp: 'tf,tp', bootfile: pxe.0, forward: 2222:22}
          - {type: isolated, name: lab1}
          - {type: bridge, bridge: br0}
          - {type: nat}
        """)
    user = HostFacts()
    root = HostFacts(net_admin=True)
    assert ",".join(netdev_parts(p, 0, user, PATHS)) == (
        f"user,id=net0,net=10.9.0.0/24,dhcpstart=10.9.0.9,restrict=on,"
        f"tftp={tmp_path}/tf,,tp,bootfile=pxe.0,hostfwd=tcp:127.0.0.1:2222-:22")
    assert ",".join(netdev_parts(p, 1, user, PATHS)) == (
        "dgram,id=net1,local.type=unix,local.path=/run/kvmrun/vm/net1.sock,"
        "remote.type=unix,remote.path=/run/kvmrun/.net/lab1/hub.sock")
    tap2, tap3 = names.tap_name("vm", 2), names.tap_name("vm", 3)
    assert ",".join(netdev_parts(p, 2, user, PATHS)) == "bridge,id=net2,br=br0"
    assert ",".join(netdev_parts(p, 2, root, PATHS)) == \
        f"tap,id=net2,ifname={tap2},script=no,downscript=no"
    assert ",".join(netdev_parts(p, 3, user, PATHS)) == \
        f"tap,id=net3,ifname={tap3},script=no,downscript=no"
    argv = compile(p, root, PATHS)
    assert argv[argv.index("-netdev", argv.index("-netdev") + 1) + 2:][:2] == [
        "-device", f"virtio-net-pci,netdev=net1,id=nic1,mac={stable_mac('vm', 1)}"]


def test_interface_names_fit_and_are_stable():
    assert names.tap_name("vm", 0) == names.tap_name("vm", 0) != names.tap_name("vm", 1)
    assert len(names.tap_name("x" * 64, 99)) <= 15
    assert names.nat_bridge_name("default") == "kvnat-default"
    assert len(names.nat_bridge_name("a-very-long-network-name")) == 15
    assert names.nft_table("my.net-1") == "kvmrun_my_net_1"


# ---------------------------------------------------------------- host checks

def test_a_forward_on_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = profile(tmp_path, f"network:\n  - forward: {port}:22\n")
        with pytest.raises(HostError) as err:
            netchecks.check(p)
    assert str(err.value) == (
        f"vm.yaml:4: network[0].forward[0]: host port 127.0.0.1:{port}/tcp is already in "
        f"use\n  hint: choose another host port, or see what holds it: ss -tlnp "
        f"'sport = :{port}'")
    netchecks.check(p)                             # free again


def test_a_udp_forward_on_a_busy_port(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        p = profile(tmp_path, f"network:\n  - forward: 'udp::{port}-:53'\n")
        with pytest.raises(HostError, match=f"127.0.0.1:{port}/udp is already in use"):
            netchecks.check(p)


def test_missing_bridge_and_tftp_dir(tmp_path):
    p = profile(tmp_path, "network:\n  - {type: bridge, bridge: nosuchbr0}\n")
    with pytest.raises(HostError) as err:
        netchecks.check(p)
    assert str(err.value).startswith(
        "vm.yaml:4: network[0].bridge: bridge 'nosuchbr0' does not exist\n  hint: create it")
    p = profile(tmp_path, "network:\n  - {tftp: nothere}\n")
    with pytest.raises(ProfileError, match="network\\[0\\].tftp: TFTP directory .* not found"):
        netchecks.check(p)
    (tmp_path / "tftp").mkdir()
    p = profile(tmp_path, "network:\n  - {tftp: tftp, bootfile: boot.ipxe}\n")
    with pytest.raises(ProfileError, match="network\\[0\\].bootfile: boot file 'boot.ipxe' "
                                           "not found in the TFTP directory"):
        netchecks.check(p)
    (tmp_path / "tftp" / "boot.ipxe").write_text("#!ipxe\n")
    netchecks.check(p)
    p = profile(tmp_path, "network:\n  - {tftp: tftp, bootfile: 'http://10.0.2.2/x.ipxe'}\n")
    netchecks.check(p)                    # a URL: nothing to look for


def test_nat_needs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(links, "is_root", lambda: False)
    p = profile(tmp_path, "network:\n  - type: nat\n")
    with pytest.raises(HostError, match="network\\[0\\]: type: nat needs root"):
        netchecks.check(p)
    with pytest.raises(HostError, match="NAT network 'default' needs root"):
        nat.nat_start("default")


def test_bridge_helper_acl(tmp_path):
    conf = tmp_path / "bridge.conf"
    other = tmp_path / "more.conf"
    other.write_text("allow br1\n")
    conf.write_text(f"# comment\nallow br0\ninclude {other}\ndeny br2\n")
    assert netchecks._bridge_allowed("br0", str(conf))
    assert netchecks._bridge_allowed("br1", str(conf))
    assert not netchecks._bridge_allowed("br2", str(conf))
    assert not netchecks._bridge_allowed("br3", str(conf))
    assert not netchecks._bridge_allowed("br0", str(tmp_path / "missing.conf"))
    conf.write_text("allow all\n")
    assert netchecks._bridge_allowed("anything", str(conf))


def test_bridge_without_root_explains_bridge_conf(tmp_path, monkeypatch):
    monkeypatch.setattr(links, "is_root", lambda: False)
    monkeypatch.setattr(links, "link_exists", lambda name: True)
    monkeypatch.setattr(links, "is_bridge", lambda name: True)
    monkeypatch.setattr(netchecks, "BRIDGE_CONF", str(tmp_path / "bridge.conf"))
    monkeypatch.setattr(netchecks, "BRIDGE_HELPER", "/bin/true")
    p = profile(tmp_path, "network:\n  - {type: bridge, bridge: br0}\n")
    with pytest.raises(HostError) as err:
        netchecks.check(p)
    assert "QEMU's bridge helper does not allow bridge 'br0'" in str(err.value)
    assert f"echo 'allow br0' >> {tmp_path}/bridge.conf" in str(err.value)


# ---------------------------------------------------------------- definitions

def test_define_list_undefine():
    assert defs.define("lab1", "isolated", "10.77.0.0/24") == {
        "name": "lab1", "type": "isolated", "subnet": "10.77.0.0/24"}
    with pytest.raises(NetworkError, match="already defined"):
        defs.define("lab1")
    with pytest.raises(NetworkError, match="overlaps kvmrun network 'lab1' \\(10.77.0.0/24\\)"):
        defs.define("lab2", "isolated", "10.77.0.128/25")
    with pytest.raises(NetworkError, match="not a valid network name"):
        defs.define("no/slash")
    assert defs.require("lab9", "isolated") == {"name": "lab9", "type": "isolated"}
    with pytest.raises(NetworkError, match="'lab9' is a isolated network, not nat"):
        defs.require("lab9", "nat")
    assert [r["name"] for r in networks.list_networks()] == ["lab1", "lab9"]
    networks.undefine("lab9")
    assert [r["name"] for r in networks.list_networks()] == ["lab1"]


def test_nat_definition_gets_a_free_subnet(monkeypatch):
    monkeypatch.setattr(links, "host_networks", lambda: [
        ("eth0", __import__("ipaddress").IPv4Network("192.168.150.0/24"))])
    defs.define("taken", "isolated", "192.168.151.0/24")
    data = defs.define("default", "nat")
    assert data == {"name": "default", "type": "nat", "subnet": "192.168.152.0/24",
                    "bridge": "kvnat-default"}
    with pytest.raises(NetworkError, match="overlaps 192.168.150.0/24 on host interface eth0"):
        defs.define("n2", "nat", "192.168.150.0/25")


def test_leases_file():
    directory = names.net_dir("default")
    directory.mkdir(parents=True)
    (directory / "leases").write_text(
        "1700000000 52:54:00:AA:bb:cc 192.168.150.23 kvmrun-guest 01:52:54:00:aa:bb:cc\n"
        "1700000001 52:54:00:11:22:33 192.168.150.99 * *\n")
    assert leases("default") == [
        {"mac": "52:54:00:aa:bb:cc", "ip": "192.168.150.23", "hostname": "kvmrun-guest",
         "expires": 1700000000},
        {"mac": "52:54:00:11:22:33", "ip": "192.168.150.99", "hostname": None,
         "expires": 1700000001}]


# ---------------------------------------------------------------- the hub

def frame(dst: str, src: str, payload: bytes = b"x" * 50) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + \
        b"\x08\x00" + payload


def test_hub_floods_learns_and_drops_strangers(tmp_path):
    directory = tmp_path / "net"
    (directory / "ports").mkdir(parents=True)
    hub = Hub(directory)
    hub.bind()
    assert json.loads((directory / "hub.json").read_text())["pid"] == os.getpid()
    socks = {}
    for name in ("a", "b", "c", "stranger"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / f"{name}.sock"))
        s.settimeout(0.2)
        socks[name] = s
        if name != "stranger":
            os.symlink(tmp_path / f"{name}.sock", directory / "ports" / f"{name}.0")
    mac = {"a": "52:54:00:00:00:0a", "b": "52:54:00:00:00:0b", "c": "52:54:00:00:00:0c"}

    def send(who: str, data: bytes) -> None:
        socks[who].sendto(data, str(directory / "hub.sock"))
        got, sender = hub.sock.recvfrom(65536)
        hub.forward(got, sender)

    def received(who: str) -> bytes | None:
        try:
            return socks[who].recv(65536)
        except socket.timeout:
            return None

    broadcast = frame("ff:ff:ff:ff:ff:ff", mac["a"])
    send("a", broadcast)                                    # flooded to the others
    assert received("b") == broadcast and received("c") == broadcast
    assert received("a") is None and received("stranger") is None
    reply = frame(mac["a"], mac["b"])
    send("b", reply)                                        # a's MAC was learnt: only a
    assert received("a") == reply and received("c") is None
    send("stranger", frame("ff:ff:ff:ff:ff:ff", "52:54:00:00:00:99"))   # not a member
    assert all(received(n) is None for n in ("a", "b", "c"))
    (directory / "ports" / "c.0").unlink()                  # c left: nothing goes to it
    hub.refresh()
    send("a", frame("ff:ff:ff:ff:ff:ff", mac["a"]))
    assert received("b") is not None and received("c") is None
    for s in socks.values():
        s.close()
    hub.sock.close()


def test_setup_and_teardown_of_an_isolated_nic(tmp_path):
    p = profile(tmp_path, "network:\n  - {type: isolated, name: lab1}\n")
    paths = RunPaths.for_guest("vm")
    paths.dir.mkdir(parents=True)
    record = nics.setup(p, paths)
    try:
        link = names.net_dir("lab1") / "ports" / "vm.0"
        assert record["ports"] == [str(link)]
        assert os.readlink(link) == str(paths.dir / "net0.sock")
        assert isolated.hub_pid(names.net_dir("lab1")) is not None
        assert isolated.members("lab1") == ["vm.0"]
        assert nic_status(Guest("vm")) == [{"index": 0, "type": "isolated",
                                              "mac": stable_mac("vm", 0), "model": None,
                                              "network": "lab1"}]
        nics.teardown(paths)
        assert isolated.members("lab1") == []
        assert nic_status(Guest("vm"))[0]["network"] == "lab1"    # kept for status
        nics.teardown(paths)                                      # twice is fine
    finally:
        isolated.hub_stop("lab1", force=True)
    assert isolated.hub_pid(names.net_dir("lab1")) is None
