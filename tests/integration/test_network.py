"""Networks against real QEMU (TCG) and the tiny guest.

    user        a forward reaches busybox httpd in the guest from 127.0.0.1; a forward on a
                port already in use fails before QEMU starts and leaves nothing behind;
                PXE: boot: n fetches an iPXE script, kernel and initrd over the user
                network's TFTP server
    isolated    two guests on one named network ping each other by static addresses; a
                third on another network reaches neither (no root, no host interface)
    bridge      (root) inside a network namespace of the test's own: a bridged guest reaches
                an address on the bridge; its tap goes when it stops; a missing bridge is a
                clear error
    nat         (root) inside a test namespace: two guests get DHCP leases from kvmrun's
                dnsmasq, reach the gateway and each other; `net stop` removes bridge, dnsmasq
                and the nftables table

Traffic stays on this machine: loopback, unix sockets, and namespaces the tests make and
delete (unique names, try/finally). The guests print what they find on their serial console.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from contextlib import contextmanager

import pytest
import yaml

from tests.integration.conftest import pid_alive
from kvmrun.net.names import stable_mac

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (network namespaces, taps)")


def kernel(guest, *lines: str, ip: str | None = None, gw: str | None = None,
           dhcp: bool = False) -> dict:
    append = f"console={guest.console} quiet"
    if ip:
        append += f" kvmrun.ip={ip}"
    if gw:
        append += f" kvmrun.gw={gw}"
    if dhcp:
        append += " kvmrun.dhcp=1"
    if lines:
        append += " kvmrun.run=" + base64.b64encode(("\n".join(lines) + "\n").encode()).decode()
    return {"path": str(guest.kernel), "initrd": str(guest.initrd), "append": append}


def serial(kr, name: str) -> str:
    try:
        return (kr.guest_dir(name) / "serial.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def type_into(kr, name: str, line: str) -> None:
    """Type one command line into a guest's serial console shell."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(kr.guest_dir(name) / "console.sock"))
        s.sendall(line.encode() + b"\n")
        time.sleep(0.3)


def guest_check(kr, name: str, command: str, tag: str, timeout: float = 120) -> bool:
    """Run `command` in the guest's console shell; True if it succeeded. The answer line
    (TAG=yes / TAG=no) is not in the echoed command line, which spells it TAG=""yes."""
    type_into(kr, name, f'{command} >/dev/null 2>&1 && echo {tag}=""yes || echo {tag}=""no')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in serial(kr, name).splitlines():
            if line.strip() in (f"{tag}=yes", f"{tag}=no"):
                return line.strip() == f"{tag}=yes"
        time.sleep(0.5)
    raise AssertionError(f"{name}: no answer to {command!r}:\n{serial(kr, name)[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HTTPD = ["mkdir -p /www", "echo KVMRUN-HTTP-$(hostname) > /www/index.html",
         "httpd -p 80 -h /www"]


# ---------------------------------------------------------------- user

def test_user_forward_reaches_guest_httpd(kr, tiny_guest):
    port = free_port()
    profile = kr.profile("web", tiny_guest,
                         kernel=kernel(tiny_guest, *HTTPD, ip="10.0.2.15/24", gw="10.0.2.2"),
                         network=[{"type": "user", "forward": [f"{port}:80"]}])
    kr.start(profile)
    body = None
    for _ in range(60):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                body = reply.read().decode()
                break
        except OSError:
            time.sleep(0.5)
    assert body == "KVMRUN-HTTP-kvmrun-guest\n"

    info = kr.status("web")
    assert info["forwards"] == [f"tcp:127.0.0.1:{port}-:80"]
    assert info["nics"] == [{"index": 0, "type": "user", "mac": stable_mac("web", 0),
                             "model": None, "forwards": [f"tcp:127.0.0.1:{port}-:80"],
                             "net": "10.0.2.0/24"}]
    assert f"nic      net0: {stable_mac('web', 0)} on user network" in kr.ok("status",
                                                                            "web").out

    # a second guest wanting the same host port: refused before QEMU, nothing left behind
    other = kr.profile("web2", tiny_guest, network=[{"type": "user",
                                                     "forward": [f"{port}:8080"]}])
    code, out, err = kr.run("start", other)
    assert code == 3, err
    assert (f"network[0].forward[0]: host port 127.0.0.1:{port}/tcp is already in use by "
            "guest 'web'") in err
    assert not kr.guest_dir("web2").exists()
    kr.ok("stop", "web")


def test_forward_on_a_busy_port_fails_before_qemu(kr, tiny_guest):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        profile = kr.profile("busy", tiny_guest, network=[{"type": "user",
                                                           "forward": [f"{port}:22"]}])
        code, out, err = kr.run("start", profile)
    assert code == 3, err
    assert f"host port 127.0.0.1:{port}/tcp is already in use" in err
    assert f"ss -tlnp 'sport = :{port}'" in err
    assert not kr.guest_dir("busy").exists()
    assert kr.our_processes() == {}


def test_restricted_user_network_still_forwards(kr, tiny_guest):
    """restrict: true cuts the guest off, but forwards still reach it; net/dhcpstart move
    QEMU's address range (the guest takes its DHCP lease from it)."""
    port = free_port()
    profile = kr.profile("rst", tiny_guest, kernel=kernel(
        tiny_guest, *HTTPD, "sleep 3; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'",
        dhcp=True), network=[{"type": "user", "forward": [f"{port}:80"], "restrict": True,
                              "net": "10.5.0.0/24", "dhcpstart": "10.5.0.40"}])
    kr.start(profile)
    assert "inet 10.5.0.40/24" in serial(kr, "rst")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
        assert reply.read().decode() == "KVMRUN-HTTP-kvmrun-guest\n"
    kr.ok("stop", "rst")


def test_pxe_boot_over_user_network_tftp(kr, tiny_guest):
    """boot: n and no kernel: SeaBIOS boots the NIC's iPXE option ROM, which takes a DHCP
    lease from QEMU's user network and fetches the boot file (an iPXE script), the kernel
    and the initrd from its built-in TFTP server (tftp: relative to the profile)."""
    tftp = kr.base / "tftpboot"
    tftp.mkdir()
    shutil.copy(tiny_guest.kernel, tftp / "vmlinuz")
    shutil.copy(tiny_guest.initrd, tftp / "initrd.img")
    (tftp / "boot.ipxe").write_text(
        "#!ipxe\n"
        f"kernel vmlinuz console={tiny_guest.console} quiet kvmrun.pxe=1\n"
        "initrd initrd.img\n"
        "boot\n")
    profile = kr.base / "pxe.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "pxe", "accel": "tcg", "memory": "256M", "boot": "n",
        "network": [{"type": "user", "tftp": "tftpboot", "bootfile": "boot.ipxe"}],
        "ready": {"console": tiny_guest.ready_marker, "timeout": 180},
    }, sort_keys=False))

    argv = kr.ok("cmdline", profile).out
    assert "-kernel" not in argv
    assert f"tftp={tftp},bootfile=boot.ipxe" in argv and "bootindex=0" in argv

    kr.start(profile)                       # returns once the network-booted guest is ready
    assert tiny_guest.ready_marker in serial(kr, "pxe")
    assert guest_check(kr, "pxe", "grep -q kvmrun.pxe=1 /proc/cmdline", "PXE")

    assert "stopped pxe: the guest powered off" in kr.ok("stop", "pxe").out
    ended = kr.status("pxe")["ended"]
    assert ended["stage"] == "acpi" and ended["shutdown_reason"] == "guest-shutdown"


# ---------------------------------------------------------------- isolated

def test_isolated_networks(kr, tiny_guest):
    lab1, lab2 = f"lab1-{uuid.uuid4().hex[:6]}", f"lab2-{uuid.uuid4().hex[:6]}"
    kr.ok("net", "define", lab1, "--subnet", "10.77.0.0/24")
    # c first (on lab2), then b, then a: a pings b, then c's address, which must fail
    c = kr.profile("c", tiny_guest, network=[{"type": "isolated", "name": lab2}],
                   kernel=kernel(tiny_guest, ip="10.77.0.3/24"))
    b = kr.profile("b", tiny_guest, network=[{"type": "isolated", "name": lab1}],
                   kernel=kernel(tiny_guest, ip="10.77.0.2/24"))
    a = kr.profile("a", tiny_guest, network=[{"type": "isolated", "name": lab1}],
                   kernel=kernel(tiny_guest, ip="10.77.0.1/24"))
    for profile in (c, b, a):
        kr.start(profile)
    assert guest_check(kr, "a", "ping -c 2 -W 3 10.77.0.2", "A_TO_B")
    assert guest_check(kr, "b", "ping -c 2 -W 3 10.77.0.1", "B_TO_A")
    assert not guest_check(kr, "a", "ping -c 2 -W 2 10.77.0.3", "A_TO_C")
    assert not guest_check(kr, "c", "ping -c 2 -W 2 10.77.0.1", "C_TO_A")

    assert kr.status("a")["nics"] == [{"index": 0, "type": "isolated",
                                       "mac": stable_mac("a", 0), "model": None,
                                       "network": lab1}]
    rows = {r["name"]: r for r in json.loads(kr.ok("net", "list", "--json").out)}
    assert rows[lab1] == {"name": lab1, "type": "isolated", "subnet": "10.77.0.0/24",
                          "running": True, "nics": 2}
    assert rows[lab2]["nics"] == 1 and rows[lab2]["subnet"] is None   # defined on first use
    code, _, err = kr.run("net", "stop", lab1)
    assert code == 4 and "in use by 2 guest NIC(s) (a.0, b.0)" in err

    for name in ("a", "b", "c"):
        kr.ok("stop", name)
        assert not (kr.guest_dir(name) / "net0.sock").exists()
    assert json.loads(kr.ok("net", "status", lab1, "--json").out)["members"] == []
    for net in (lab1, lab2):
        kr.ok("net", "stop", net)
    assert all(not r["running"] for r in json.loads(kr.ok("net", "list", "--json").out))


# ---------------------------------------------------------------- namespaces (root)

@contextmanager
def netns():
    """A network namespace of this test's own, deleted (with all it holds) afterwards."""
    name = f"krtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check)


def kr_ns(kr, ns: str, *args):
    """`kvmrun ARGS` run inside the namespace: the guests' QEMU, taps, dnsmasq live there."""
    proc = subprocess.run(["ip", "netns", "exec", ns, *kr.argv(*args)], env=kr.env,
                          capture_output=True, text=True, timeout=240, cwd=kr.base,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def ok_ns(kr, ns: str, *args) -> str:
    code, out, err = kr_ns(kr, ns, *args)
    assert code == 0, f"kvmrun {' '.join(map(str, args))}: exit {code}\n{out}\n{err}"
    return out


@needs_root
def test_bridged_guest_reaches_the_bridge(kr, tiny_guest):
    with netns() as ns:
        in_ns(ns, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(ns, "ip", "addr", "add", "10.88.0.1/24", "dev", "br0")
        in_ns(ns, "ip", "link", "set", "br0", "up")
        missing = kr.profile("nobr", tiny_guest, network=[{"type": "bridge",
                                                           "bridge": "br9"}])
        code, _, err = kr_ns(kr, ns, "start", missing)
        assert code == 3 and "network[0].bridge: bridge 'br9' does not exist" in err
        assert not kr.guest_dir("nobr").exists()

        profile = kr.profile("br", tiny_guest, network=[{"type": "bridge", "bridge": "br0"}],
                             kernel=kernel(tiny_guest, *HTTPD, ip="10.88.0.2/24"))
        ok_ns(kr, ns, "start", profile)
        tap = json.loads(ok_ns(kr, ns, "status", "br", "--json"))["nics"][0]["tap"]
        assert "master br0" in in_ns(ns, "ip", "link", "show", tap).stdout
        assert guest_check(kr, "br", "ping -c 2 -W 3 10.88.0.1", "BR_TO_HOST")
        fetch = in_ns(ns, sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                      "'http://10.88.0.2/', timeout=20).read().decode(), end='')")
        assert fetch.stdout == "KVMRUN-HTTP-kvmrun-guest\n"
        ok_ns(kr, ns, "stop", "br")
        assert in_ns(ns, "ip", "link", "show", tap, check=False).returncode != 0


@needs_root
def test_nat_network(kr, tiny_guest):
    with netns() as ns:
        ok_ns(kr, ns, "net", "define", "default", "--type", "nat", "--subnet",
              "10.123.0.0/24")
        code, _, err = kr_ns(kr, ns, "net", "define", "other", "--type", "nat", "--subnet",
                             "10.123.0.128/25")
        assert code == 3 and "overlaps kvmrun network 'default' (10.123.0.0/24)" in err
        for name in ("n1", "n2"):
            profile = kr.profile(name, tiny_guest, network=[{"type": "nat"}],
                                 kernel=kernel(tiny_guest, dhcp=True))
            ok_ns(kr, ns, "start", profile)          # the first start brings the network up
        leases = {}
        for name in ("n1", "n2"):
            deadline = time.monotonic() + 60
            while "lease" not in (nic := json.loads(ok_ns(kr, ns, "status", name, "--json")
                                                    )["nics"][0]):
                assert time.monotonic() < deadline, f"{name} got no DHCP lease"
                time.sleep(1)
            assert nic["mac"] == stable_mac(name, 0)
            leases[name] = nic["lease"]["ip"]
            assert leases[name].startswith("10.123.0.")
        assert f"lease {leases['n1']}" in ok_ns(kr, ns, "status", "n1")
        assert guest_check(kr, "n1", "ping -c 2 -W 3 10.123.0.1", "N1_TO_GW")
        assert guest_check(kr, "n1", f"ping -c 2 -W 3 {leases['n2']}", "N1_TO_N2")
        assert guest_check(kr, "n2", f"ping -c 2 -W 3 {leases['n1']}", "N2_TO_N1")
        info = json.loads(ok_ns(kr, ns, "net", "status", "default", "--json"))
        assert info["running"] and len(info["taps"]) == 2 and len(info["leases"]) == 2
        assert "table ip kvmrun_default" in in_ns(ns, "nft", "list", "tables").stdout
        uids = [line.split()[1:] for line in Path(f"/proc/{info['dnsmasq_pid']}/status")
                .read_text().splitlines() if line.startswith("Uid:")][0]
        assert "0" not in uids                     # dnsmasq dropped root (issue 12)

        code, _, err = kr_ns(kr, ns, "net", "stop", "default")
        assert code == 4 and "in use by 2 guest NIC(s)" in err
        for name in ("n1", "n2"):
            ok_ns(kr, ns, "stop", name)
        dnsmasq = info["dnsmasq_pid"]
        ok_ns(kr, ns, "net", "stop", "default")
        assert in_ns(ns, "ip", "link", "show", "kvnat-default", check=False).returncode != 0
        assert "kvmrun_default" not in in_ns(ns, "nft", "list", "tables").stdout
        assert not pid_alive(dnsmasq)
        assert not (kr.run_dir / ".net" / "default").exists()
