"""`kvmrun ssh`: the ssh command line that reaches a guest through its user-network port
forward to guest port 22, the login defaults a profile gives it, and the wait for sshd.

Defaults come from the profile at start (kept in the launch record): `ssh.user`, and
`ssh.identity` or else the private half of a `cloud_init.ssh_authorized_keys` `.pub` file
(KEY.pub -> KEY, when that file exists). `session` gives everything the verb needs for a
running guest; `connect` waits for sshd, runs ssh on the terminal and returns its exit code."""

from __future__ import annotations

import re
import time
from pathlib import Path
from collections.abc import Callable
TYPE_CHECKING = False          # not typing's: its import (~3 ms) is not on a start's way

from kvmrun import proc
from kvmrun.errors import GuestError, GuestTimeout, HostError
from kvmrun.guest.rundir import Guest, require_running
from kvmrun.proc import log_argv

if TYPE_CHECKING:
    from kvmrun.profile import Profile

# socket and subprocess are imported by the functions that use them: every start
# reads login_defaults (~5 ms of its imports).

FWD_RE = re.compile(r"tcp:([\d.]*):(\d+)-[\d.]*:22$")
OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR")      # a fresh guest has a new host key every time
CONNECT_TIMEOUT = 10                    # ssh -o ConnectTimeout
ROOT_REFUSED = 142     # cloud-init's disable_root: root's key runs "Please login as …; exit 142"


def login_defaults(profile: Profile) -> dict:
    """{"user", "identity"} for `kvmrun ssh` from a profile (None where it says nothing)."""
    from kvmrun.profile.model import is_key_file
    identity = profile.ssh.identity
    ci = profile.cloud_init
    if identity is None and ci is not None:
        for key in ci.ssh_authorized_keys:
            if is_key_file(key):                 # made absolute when the profile loaded
                private = Path(key.strip()).with_suffix("")
                if private.is_file():
                    identity = str(private)
                    break
    return {"user": profile.ssh.user, "identity": identity}


def target(name: str, forwards: list[str]) -> tuple[str, int]:
    """The host address and port that lead to the guest's port 22."""
    for fwd in forwards:
        m = FWD_RE.match(fwd)
        if m:
            addr = m.group(1) if m.group(1) not in ("", "0.0.0.0") else "127.0.0.1"
            return addr, int(m.group(2))
    raise GuestError(f"{name} has no port forward to guest port 22",
                     hint="add one to its profile: network: [{type: user, forward: "
                          "[\"2222:22\"]}]")


def ssh_argv(name: str, forwards: list[str], user: str | None = None,
             identity: str | None = None, command: list[str] = ()) -> list[str]:
    addr, port = target(name, forwards)
    argv = ["ssh", "-p", str(port), *OPTIONS, "-o", f"ConnectTimeout={CONNECT_TIMEOUT}"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    if user:
        argv += ["-l", user]
    argv.append(addr)
    if command:
        argv += ["--", *command]
    return argv


def banner(addr: str, port: int, timeout: float = 5.0) -> bool:
    """Whether an ssh server answers there. A user-network forward accepts every connection
    and closes it when the guest's port is shut, so only the banner tells."""
    import socket
    try:
        with socket.create_connection((addr, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_sshd(name: str, addr: str, port: int, timeout: float,
                  note: Callable[[str], None] = lambda m: None,
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Return once sshd answers; GuestTimeout after `timeout` seconds (a note goes out
    once, when the first try fails)."""
    deadline = time.monotonic() + timeout
    first = True
    while not banner(addr, port, timeout=min(5.0, max(0.5, timeout))):
        if not alive():
            raise GuestError(f"{name} stopped while waiting for its sshd")
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"the sshd of {name} did not answer on {addr}:{port} within "
                               f"{timeout:g}s",
                               hint=f"is openssh-server installed in the guest and has it "
                                    f"finished booting? see `kvmrun logs {name}`")
        if first:
            note(f"kvmrun: waiting for the sshd of {name} on {addr}:{port} "
                 f"(up to {timeout:g}s)…")
            first = False
        time.sleep(1.0)


def explain(code: int, user: str | None) -> str | None:
    """A plain word for ssh exit codes whose cause kvmrun can tell."""
    if code == ROOT_REFUSED and user in (None, "root"):
        return ("the guest refuses root logins (cloud-init's disable_root): log in as the "
                "image's default user (debian on Debian, ubuntu on Ubuntu): kvmrun ssh -l "
                "debian NAME, or set ssh: {user: debian} in the profile")
    if code == 255:
        return ("ssh could not log in (exit 255): check the user (ssh.user, -l) and the key "
                "(ssh.identity, -i; default: the private half of a "
                "cloud_init.ssh_authorized_keys .pub file)")
    return None


def session(guest: Guest, user: str | None = None, identity: str | None = None,
            command: list[str] = ()) -> dict:
    """For a running guest: {"argv", "addr", "port", "user"}, the user and identity given
    here, else the profile's (kept in the launch record at start)."""
    require_running(guest)
    launch = guest.read_launch()
    login = launch.ssh_login
    user = user or login.get("user")
    identity = identity or login.get("identity")
    addr, port = target(guest.name, launch.forwards)
    return {"argv": ssh_argv(guest.name, launch.forwards, user, identity, command),
            "addr": addr, "port": port, "user": user}


def connect(guest: Guest, found: dict, wait: float,
            note: Callable[[str], None] = lambda m: None) -> int:
    """Run the ssh of `session` on this terminal once the guest's sshd answers (up to `wait`
    seconds); ssh's exit code."""
    argv = found["argv"]
    import subprocess
    if not proc.which(argv[0]):
        raise HostError(f"{argv[0]} not found", hint="apt-get install openssh-client")
    wait_for_sshd(guest.name, found["addr"], found["port"], wait, note=note,
                  alive=lambda: guest.qemu_pid() is not None)
    log_argv(argv)
    return subprocess.call(argv)
