"""Two "hosts" on this machine for the remote-control, export and migration tests.

Each host is a network namespace with its own OpenSSH sshd (on its own address, behind a
bridge in the root namespace), its own kvmrun directories (sshd's SetEnv), reached through
an alias in an ssh config the fixture writes (`ssh -F CONFIG hosta`), with a key it makes.
Both see this machine's file system, so "shared storage" is any path, and a disk copied to
the other host must go to a directory of its own (--target-dir).

The sshds die with the test process (PR_SET_PDEATHSIG) and are ended by PID at teardown;
so are the processes whose command line names the fixture's directory (the hosts' guests).
Needs root (ip netns); the tests skip without it.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import KVMRUN, kill_identified, processes_mentioning

SSHD = "/usr/sbin/sshd"


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _sshd_children(pid: int) -> list[int]:
    """The sshd processes below sshd `pid` (per connection: the monitor and its child)."""
    found = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for kid in map(int, kids):
        try:
            if Path(f"/proc/{kid}/comm").read_text().strip() == "sshd":
                found += [kid, *_sshd_children(kid)]
        except OSError:
            pass
    return found


@dataclass
class SshHost:
    alias: str
    netns: str
    address: str
    root: Path                       # its kvmrun directories live here
    veth: str                        # the root-namespace end of its link (cut: set down)
    sshd: subprocess.Popen | None = None
    env: dict | None = None          # what its ssh sessions get (sshd's SetEnv)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"


class Hosts:
    def __init__(self, base: Path):
        self.base = base
        tag = f"kh{random.randrange(16**4):04x}"
        self.tag = tag
        self.bridge = f"{tag}br"
        net = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.gateway = f"{net}.1"
        self.ssh_config = base / "ssh_config"
        self.key = base / "id_ed25519"
        self.hosts = {
            name: SshHost(f"host{name}", f"{tag}{name}", f"{net}.{2 + i}", base / name,
                          f"{tag}{name}0")
            for i, name in enumerate("ab")}
        self.ssh = f"ssh -F {self.ssh_config}"
        self.joined: list[str] = []          # veths of namespaces put on the bridge

    def __getitem__(self, name: str) -> SshHost:
        return self.hosts[name]

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        for key in (self.key, self.base / "host_key", self.base / "other_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        shutil.copy(f"{self.key}.pub", self.base / "authorized_keys")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        lines = []
        for host in self.hosts.values():
            self._namespace(host)
            lines += [f"Host {host.alias}", f"  HostName {host.address}", "  User root",
                      f"  IdentityFile {self.key}", "  IdentitiesOnly yes",
                      "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
                      "  LogLevel ERROR", "  BatchMode yes", "  ConnectTimeout 10", ""]
        lines += ["Host hosta-badkey", f"  HostName {self['a'].address}", "  User root",
                  f"  IdentityFile {self.base / 'other_key'}", "  IdentitiesOnly yes",
                  "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null",
                  "  LogLevel ERROR", "  BatchMode yes", ""]
        self.ssh_config.write_text("\n".join(lines))
        for host in self.hosts.values():
            self._sshd(host)

    def _namespace(self, host: SshHost) -> None:
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
            "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")

    def join(self, pid: int, index: int = 10) -> str:
        """Put the network namespace of process `pid` (e.g. the NFS server's) on the hosts'
        bridge: a veth whose far end is its eth0 at address .INDEX; that address."""
        address = f"{self.gateway.rsplit('.', 1)[0]}.{index}"
        veth = f"{self.tag}j{index}"
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
        _ip("link", "set", veth, "master", self.bridge, "up")
        self.joined.append(veth)
        inside = ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip"]
        subprocess.run([*inside, "addr", "add", f"{address}/24", "dev", "eth0"], check=True)
        subprocess.run([*inside, "link", "set", "eth0", "up"], check=True)
        return address

    def in_mounts(self, name: str) -> list[str]:
        """A command prefix that runs in host `name`'s mount namespace (its sshd's: `ip netns
        exec` makes one, and / is not a shared mount here, so a mount made outside it is
        not seen there)."""
        return ["nsenter", "-t", str(self[name].sshd.pid), "-m", "--"]

    def kill_sshd(self, name: str, sessions: bool = False) -> None:
        """End host `name`'s sshd listener, waiting for it: sessions already open go on, as
        with a real sshd restarted; with `sessions`, the sshd processes of every open
        connection are killed first (SIGKILL: sshd crashed, with all it served)."""
        sshd = self[name].sshd
        if sessions:
            for pid in _sshd_children(sshd.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        sshd.terminate()
        sshd.wait(10)

    def restart_sshd(self, name: str) -> None:
        self._sshd(self[name])

    def _sshd(self, host: SshHost) -> None:
        for sub in ("run", "config", "data", "cache"):
            (host.root / sub).mkdir(parents=True, exist_ok=True)
        path = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:" \
               "/usr/bin:/sbin:/bin"
        host.env = env = {"PATH": path, "KVMRUN_RUN_DIR": host.run_dir,
               "KVMRUN_CONFIG_DIR": host.config_dir, "KVMRUN_DATA_DIR": host.root / "data",
               "KVMRUN_CACHE_DIR": host.root / "cache", "KVMRUN_ACCEL": "tcg",
               "KVMRUN_SSH": self.ssh, "KVMRUN_REMOTE_COMMAND": KVMRUN}
        config = host.root / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {host.address}:22", f"HostKey {self.base / 'host_key'}",
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
            f"PidFile {host.root / 'sshd.pid'}", "UsePAM no", "StrictModes no",
            "PermitRootLogin yes", "PasswordAuthentication no", "ClientAliveInterval 5",
            "SetEnv " + " ".join(f'"{k}={v}"' for k, v in env.items()), ""]))
        log = open(host.root / "sshd.log", "ab")
        host.sshd = subprocess.Popen(["ip", "netns", "exec", host.netns, SSHD, "-D", "-e",
                                      "-f", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((host.address, 22), timeout=1).close()
                return
            except OSError:
                if host.sshd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd for {host.alias} did not start: "
                                       + (host.root / "sshd.log").read_text())
                time.sleep(0.1)

    # ------------------------------------------------------------ use
    def env(self, base: dict) -> dict:
        """An environment for the local kvmrun that reaches the hosts."""
        return {**base, "KVMRUN_SSH": self.ssh, "KVMRUN_REMOTE_COMMAND": str(KVMRUN)}

    def link(self, name: str, up: bool) -> None:
        """Cut (or mend) host `name`'s link to the others."""
        _ip("link", "set", self[name].veth, "up" if up else "down")

    def ssh_run(self, name: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A shell command on host `name` (as its sessions see the world)."""
        return subprocess.run(["ssh", "-F", str(self.ssh_config), self[name].alias, command],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def popen_on(self, name: str, argv: list, **kwargs) -> subprocess.Popen:
        """`argv` run on host `name` directly (in its namespace, with its environment), not
        through ssh: a signal sent to it reaches that very process."""
        env = {k: str(v) for k, v in self[name].env.items()}
        return subprocess.Popen(["ip", "netns", "exec", self[name].netns, "env", "-i",
                                 *(f"{k}={v}" for k, v in env.items()), *map(str, argv)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kwargs)

    def processes(self) -> dict[int, int]:
        return processes_mentioning(str(self.base))

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        for host in self.hosts.values():
            if host.sshd and host.sshd.poll() is None:
                host.sshd.terminate()
                try:
                    host.sshd.wait(10)
                except subprocess.TimeoutExpired:
                    host.sshd.kill()
                    host.sshd.wait()
        for _ in range(3):
            found = self.processes()
            if not found:
                break
            for pid, start in found.items():
                kill_identified(pid, start, str(self.base))
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
        for veth in self.joined:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts():
    """Two ssh "hosts", `hosts["a"]` and `hosts["b"]` (aliases hosta, hostb)."""
    if os.geteuid() != 0 or not os.path.exists(SSHD) or shutil.which("ip") is None:
        pytest.skip("needs root, openssh-server and iproute2")
    base = Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
    made = Hosts(base)
    try:
        made.setup()
        yield made
    finally:
        made.teardown()
