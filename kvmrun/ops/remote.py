"""Remote control over OpenSSH: `kvmrun -H [USER@]HOST[:PORT] VERB …` runs VERB there.

Every connection kvmrun makes goes through the system's `ssh` (so ~/.ssh/config aliases, keys,
agents and ProxyJump work): the command is `$KVMRUN_SSH` (default `ssh`, split like a shell
would), and the program run there is `$KVMRUN_REMOTE_COMMAND` (default `kvmrun`).

    parse_host(spec)           "[USER@]HOST[:PORT]" -> Host
    split_hosts(argv)          take every -H/--host out of a command line (KVMRUN_HOST too)
    ssh_argv(host, words, …)   the ssh command line running `words` there (one shell string)
    call(host, argv, …)        run `kvmrun ARGV` there with our stdin/stdout: its exit code
    capture(host, argv, …)     the same, output captured: (code, stdout, stderr)
    script(host, text, …)      a short POSIX shell script there, output captured
    forward_sockets(host, …)   `-L LOCAL:REMOTE` for unix sockets, up when it returns
    one_connection(host)       a block whose ssh commands to `host` share one connection
                               (an OpenSSH ControlMaster): one handshake, not one each
    send_profile(host, path)   a local profile, `extends` resolved, into a remote temp dir

ssh itself exits 255 when it cannot connect or log in, and a shell exits 127 for a command it
cannot find; those become one RemoteError line (exit 3): the remote kvmrun never exits 255.
Any other line on stderr is the remote kvmrun's and is relayed unchanged, as it comes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Iterator, Sequence

from kvmrun.errors import ProfileError, ProfileErrors, RemoteError, UsageError
from kvmrun.proc import log_argv
from kvmrun.records import record

HOST_OPTIONS = ("-H", "--host")
HOST_RE = re.compile(r"(?:(?P<user>[^@\s/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@:\s/\[\]]+)"
                     r"(?::(?P<port>\d{1,5}))?")
# what ssh (not the remote kvmrun) writes when it fails
SSH_LINE = re.compile(r"^(ssh: |kex_exchange_identification|Connection (closed|reset|timed)|"
                      r"Host key verification failed|.*Permission denied \(|"
                      r"client_loop: |Connection to .* closed|banner exchange|"
                      r"ssh_exchange_identification|Bad owner or permissions|"
                      r"Could not resolve|no such identity|Load key )")
NOT_FOUND = re.compile(r"(command not found|: not found|No such file or directory)")
PID_LINE = "KVMRUN-REMOTE-PID "     # the first stderr line of `call` without a TTY


@record(frozen=True)
class Host:
    spec: str                          # as the user wrote it
    destination: str                   # [user@]host for ssh
    port: int | None = None

    def __str__(self) -> str:
        return self.spec


def parse_host(spec: str) -> Host:
    m = HOST_RE.fullmatch(spec.strip())
    if not spec.strip() or not m:
        raise UsageError(f"bad --host {spec!r}: expected [USER@]HOST[:PORT]",
                         hint="an ssh config alias works too: -H web-server")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"bad --host {spec!r}: port {port} is out of range")
    host = m["host"].strip("[]")
    return Host(spec, f"{m['user']}@{host}" if m["user"] else host, port)


def split_hosts(argv: list[str]) -> tuple[list[Host], list[str]]:
    """Every -H/--host (before a `--`) out of `argv`; none given: $KVMRUN_HOST, if set.
    `-H ''` (or KVMRUN_HOST='') means this machine."""
    hosts: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in HOST_OPTIONS:
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value: [USER@]HOST[:PORT]")
            hosts.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--host="):
            hosts.append(arg.split("=", 1)[1])
        elif arg.startswith("-H") and len(arg) > 2:
            hosts.append(arg[2:])
        else:
            rest.append(arg)
        i += 1
    if not hosts and os.environ.get("KVMRUN_HOST"):
        hosts = [os.environ["KVMRUN_HOST"]]
    return [parse_host(h) for h in hosts if h.strip()], rest


# ---------------------------------------------------------------- command lines

def ssh_command() -> list[str]:
    """$KVMRUN_SSH as argv (default: ssh)."""
    try:
        words = shlex.split(os.environ.get("KVMRUN_SSH") or "ssh")
    except ValueError as err:
        raise UsageError(f"KVMRUN_SSH cannot be split into words: {err}") from None
    return words or ["ssh"]


def remote_command() -> list[str]:
    try:
        words = shlex.split(os.environ.get("KVMRUN_REMOTE_COMMAND") or "kvmrun")
    except ValueError as err:
        raise UsageError(f"KVMRUN_REMOTE_COMMAND cannot be split into words: {err}") from None
    return words or ["kvmrun"]


# host -> one_connection's master: (its ControlPath, its process)
_MASTERS: dict[Host, tuple[str, subprocess.Popen]] = {}


def ssh_argv(host: Host, words: Sequence[str] | None = None, *, tty: bool = False,
             options: Sequence[str] = (), shell: str | None = None,
             shared: bool = True) -> list[str]:
    """ssh to `host` running `words` (quoted into one shell string) or the shell text
    `shell`; `options` go to ssh itself (e.g. -L forwards). Inside `one_connection(host)`
    (and `shared`), through its master connection."""
    if shared and host in _MASTERS:
        options = ["-o", "ControlMaster=no", "-o", f"ControlPath={_MASTERS[host][0]}",
                   *options]
    argv = [*ssh_command(), "-t" if tty else "-T", *options]
    if host.port:
        argv += ["-p", str(host.port)]
    command = shell if shell is not None else shlex.join(words or [])
    return [*argv, "--", host.destination, command]


def kvmrun_words(argv: Sequence[str]) -> list[str]:
    return [*remote_command(), *argv]


# ---------------------------------------------------------------- running

class Relay(threading.Thread):
    """Relays a child's stderr to ours line by line, holding back the lines ssh (or the
    remote shell) writes about itself, which become one RemoteError instead."""

    def __init__(self, stream, relay: bool = True):
        super().__init__(daemon=True)
        self.stream, self.relay = stream, relay
        self.held: list[str] = []
        self.lines: list[str] = []
        self.pid: int | None = None        # the remote command's, when it said (PID_LINE)

    def run(self) -> None:
        import sys
        for raw in iter(self.stream.readline, b""):
            line = raw.decode(errors="replace")
            said = line.removeprefix(PID_LINE).strip()
            if self.pid is None and line.startswith(PID_LINE) and said.isdigit():
                self.pid = int(said)
                continue
            self.lines.append(line)
            if SSH_LINE.match(line) or NOT_FOUND.search(line):
                self.held.append(line)
            elif self.relay:
                sys.stderr.write(line)
                sys.stderr.flush()


def failure_of(host: Host, code: int, relay: Relay, what: str) -> RemoteError | None:
    """The RemoteError for an ssh (255) or command-not-found (127) exit, or None."""
    held = [line.strip() for line in relay.held if line.strip()]
    reason = held[-1] if held else ""
    if code == 255:
        if "Permission denied" in reason or "verification failed" in reason:
            return RemoteError(f"cannot log in to {host}: {reason}")
        return RemoteError(f"cannot reach {host} over ssh"
                           + (f": {reason.removeprefix('ssh: ')}" if reason else ""))
    if code == 127 and any(NOT_FOUND.search(line) for line in held):
        return RemoteError(f"{host} has no {what} ({reason}; KVMRUN_REMOTE_COMMAND names "
                           "the command there)")
    return None


def never_connected(err: RemoteError) -> bool:
    """Whether ssh failed before it reached the host (so the command surely did not run)."""
    return any(s in err.message for s in ("connect to host", "Could not resolve",
                                          "Name or service not known", "No route to host"))


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    log_argv(argv)
    try:
        return subprocess.Popen(argv, **kwargs)
    except OSError as err:
        raise RemoteError(f"cannot run {argv[0]!r}: {err.strerror or err}",
                          hint="KVMRUN_SSH names the ssh command") from None


def finish(host: Host, proc: subprocess.Popen, relay: Relay, what: str) -> int:
    """Wait for `proc`; its exit code, or RemoteError for ssh's own failures. Ctrl-C
    (SIGINT) while it runs is sent on to the remote command when it said its PID (see
    `call`), and its own exit code (130 after rolling back) comes back; otherwise ssh ends."""
    import sys
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        if relay.pid is None or not _interrupt_there(host, relay.pid):
            proc.terminate()
            proc.wait()
            raise
        try:
            code = proc.wait()
        except KeyboardInterrupt:            # a second Ctrl-C: do not wait for it
            proc.terminate()
            proc.wait()
            raise
    relay.join(5)
    failure = failure_of(host, code, relay, what)
    if failure:
        raise failure
    if relay.relay:
        sys.stderr.writelines(relay.held)      # not ssh's after all: the remote's own
    return code


def _interrupt_there(host: Host, pid: int) -> bool:
    """SIGINT to process `pid` on `host`, through a second ssh: without a TTY, ssh relays no
    signal, and sshd ends a session's command only when it next writes to a closed pipe."""
    try:
        code, _, _ = capture(host, shell=f"kill -INT {int(pid)}", what="kill")
    except RemoteError:
        return False
    return code == 0


def ignore_sigint() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # ssh then keeps it ignored


def call(host: Host, argv: Sequence[str], *, tty: bool = False, stdin=None) -> int:
    """`kvmrun ARGV` on `host` with our stdin (or `stdin`) and stdout; its exit code.
    With a TTY (ssh -t), Ctrl-C reaches the remote command through it. Without one, ssh
    ignores SIGINT and the remote shell says its PID first (PID_LINE on stderr, then
    `exec`), so `finish` can interrupt that very process."""
    words = kvmrun_words(argv)
    if tty:
        proc = spawn(ssh_argv(host, words, tty=True), stdin=stdin, stderr=subprocess.PIPE)
    else:
        command = f"echo {PID_LINE}$$ >&2; exec {shlex.join(words)}"
        proc = spawn(ssh_argv(host, shell=command), stdin=stdin, stderr=subprocess.PIPE,
                      preexec_fn=ignore_sigint)
    relay = Relay(proc.stderr)
    relay.start()
    return finish(host, proc, relay, shlex.join(remote_command()))


def capture(host: Host, argv: Sequence[str] | None = None, *, shell: str | None = None,
            input: bytes | None = None, what: str | None = None) -> tuple[int, str, str]:
    """`kvmrun ARGV` (or the shell text `shell`) on `host`, output captured."""
    argv_ = ssh_argv(host, kvmrun_words(argv or []) if shell is None else None, shell=shell)
    proc = spawn(argv_, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay = Relay(proc.stderr, relay=False)
    relay.start()
    try:
        out, _ = proc.communicate(input)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    relay.join(5)
    failure = failure_of(host, proc.returncode, relay,
                       what or shlex.join(remote_command()))
    if failure:
        raise failure
    return proc.returncode, out.decode(errors="replace"), "".join(relay.lines)


def script(host: Host, text: str, input: bytes | None = None) -> str:
    """Run a POSIX shell script on `host`; its stdout, RemoteError when it fails."""
    code, out, err = capture(host, shell=text, input=input, what="sh")
    if code != 0:
        raise RemoteError(f"on {host}: {err.strip() or f'exit status {code}'}")
    return out


class MasterForward:
    """Forwards that one_connection's master carries (`ssh -O forward`), handled like the
    process of a `ssh -N -L` of their own: alive while the master is, ended by
    `ssh -O cancel`."""

    def __init__(self, host: Host, master: subprocess.Popen, forwards: list[str]):
        import io
        self.host, self.master, self.forwards = host, master, forwards
        self.stderr = io.BytesIO(b"the ssh connection ended")

    def poll(self) -> int | None:
        return self.master.poll()

    def terminate(self) -> None:
        if self.master.poll() is None and self.host in _MASTERS:
            subprocess.run(ssh_argv(self.host, shell="", options=["-O", "cancel",
                                                                  *self.forwards])[:-1],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)

    def wait(self, timeout: float | None = None) -> int | None:
        return self.poll()

    kill = terminate


def forward_sockets(host: Host, pairs, timeout: float = 30):
    """Forward each local unix socket path to a remote one (`-L L:R`; unix sockets rather
    than TCP ports, as Proxmox does: no port to pick or to leak): in one_connection's
    master when there is one (MasterForward), else one `ssh -N` of their own. Returns once
    every local socket exists; the caller ends it (terminate, wait). Keep-alives end it
    when the link is cut."""
    import time
    for local, _ in pairs:
        Path(local).unlink(missing_ok=True)
    forwards = [arg for local, there in pairs for arg in ("-L", f"{local}:{there}")]
    if host in _MASTERS:
        done = subprocess.run(ssh_argv(host, shell="", options=["-O", "forward",
                                                                *forwards])[:-1],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if done.returncode == 0 and all(Path(local).exists() for local, _ in pairs):
            return MasterForward(host, _MASTERS[host][1], forwards)
        raise RemoteError(done.stderr.decode(errors="replace").strip()
                          or "the forward did not come up")
    argv = ssh_argv(host, shell="", shared=False, options=[
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", *forwards])[:-1]
    tunnel = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not all(Path(local).exists() for local, _ in pairs):
        if tunnel.poll() is not None or time.monotonic() > deadline:
            tunnel.kill()
            tunnel.wait()
            raise RemoteError(tunnel.stderr.read().decode(errors="replace").strip()
                              or f"no forward after {timeout:g}s")
        time.sleep(0.05)
    return tunnel


@contextlib.contextmanager
def one_connection(host: Host, timeout: float = 30) -> Iterator[None]:
    """Every ssh to `host` inside the block, and forward_sockets' forwards, go through one
    connection: an OpenSSH master (`-M -N`, its ControlPath in a private
    temporary directory), ended when the block ends. Its keep-alives end it, and so every
    session in it, when the link is cut. Should it not come up, each ssh connects by
    itself, as without it (and says why it cannot, if that is the problem)."""
    import shutil
    import tempfile
    import time
    directory = tempfile.mkdtemp(prefix="kvmrun-ssh-")
    path = os.path.join(directory, "master")
    argv = ssh_argv(host, shell="", shared=False, options=[
        "-M", "-N", "-o", f"ControlPath={path}", "-o", "ControlPersist=no",
        "-o", "StreamLocalBindUnlink=yes",
        "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"])[:-1]
    master = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path) and master.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        if os.path.exists(path):
            _MASTERS[host] = (path, master)
        yield
    finally:
        _MASTERS.pop(host, None)
        if master.poll() is None:
            master.terminate()
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- local profiles

def local_profile(ref: str) -> Path | None:
    """The local file a PROFILE argument names, if it is one (a path to an existing file
    that is .yaml or contains '/'); None for the name of a VM defined there."""
    path = Path(ref)
    if (path.suffix in (".yaml", ".yml") or "/" in ref) and path.is_file():
        return path
    return None


def missing_there(host: Host, profile) -> list[ProfileError]:
    """The files the profile refers to that do not exist on `host`."""
    from kvmrun.profile import referenced_files
    refs = [ref for ref in referenced_files(profile) if ref[2]]   # pool volumes: resolved there
    if not refs:
        return []
    listing = "".join(f"{path}\n" for _, _, path in refs)
    out = script(host, 'while IFS= read -r p; do [ -e "$p" ] || printf "%s\\n" "$p"; done',
                 input=listing.encode())
    gone = set(out.splitlines())
    return [ProfileError(loc, f"{what} {path!r} does not exist on {host}")
            for loc, what, path in refs if path in gone]


def send_profile(host: Host, path: Path) -> tuple[str, str]:
    """Copy the local profile at `path`, `extends` resolved and paths made absolute, into a
    fresh temporary directory on `host`: (the remote file, the directory to remove).
    ProfileErrors naming each file it refers to that does not exist there."""
    import yaml

    from kvmrun.profile import load, to_dict
    profile = load(path)
    missing = missing_there(host, profile)
    if missing:
        raise ProfileErrors(missing)
    text = yaml.safe_dump(to_dict(profile), sort_keys=False, allow_unicode=True)
    name = shlex.quote(f"{profile.name}.yaml")
    directory = script(host, f'd=$(mktemp -d -t kvmrun-profile.XXXXXX) && '
                             f'cat > "$d"/{name} && printf "%s" "$d"',
                       input=text.encode()).strip()
    if not directory.startswith("/"):
        raise RemoteError(f"on {host}: could not make a temporary directory ({directory!r})")
    return f"{directory}/{profile.name}.yaml", directory


def remove_dir(host: Host, directory: str) -> None:
    try:
        script(host, f"rm -rf -- {shlex.quote(directory)}")
    except RemoteError:
        pass
