"""A real userspace NFS server for tests: nfs-ganesha (FSAL VFS) + rpcbind in private
network, mount and PID namespaces (see /work/shared/recipes/nfs-userspace-smoke.sh).

    server = NfsServer(base)            # exports base/export as SERVER:/export
    server.start()                      # ready when `rpcinfo -p 127.0.0.1` lists mountd
    server.wrap(argv)                   # argv run in the server's network namespace
    server.kill_ganesha(); server.start_ganesha()     # the server going away and back
    server.stop()                       # SIGTERM, SIGKILL after 5 s, by PID

`unshare --net --mount --pid --fork --mount-proc --kill-child` runs this file again (`--inner`)
as PID 1 of the new PID namespace: only `lo` exists, `/run` is a private tmpfs, and rpcbind and
ganesha are its children, ended by PID. It obeys one-word commands on stdin (start, kill, stop)
and answers one line each; when stdin closes (the test process went away) it stops both and
exits, and with it the namespace and anything left in it. Clients -- kvmrun, its supervisor,
QEMU, qemu-img -- reach the server at 127.0.0.1 after `nsenter --net` into that namespace
(only the network namespace: the files they use are the host's).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("unshare", "nsenter", "rpcbind", "rpcinfo", "ganesha.nfsd", "ip")
GANESHA_FSAL = "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"
EXPORT = "/export"

CONFIG = """NFS_CORE_PARAM {{ Protocols = 3, 4; NFS_Port = 2049; MNT_Port = 20048;
  Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; mount_path_pseudo = true; }}
NFSv4 {{ Graceless = true; Only_Numeric_Owners = true; RecoveryRoot = {base}/recov; }}
EXPORT {{ Export_Id = 1; Path = {base}/export; Pseudo = {pseudo}; Protocols = 3, 4;
  Transports = TCP; Access_Type = {access}; Squash = {squash}; SecType = sys;
  FSAL {{ Name = VFS; }} }}
"""


def why_not() -> str | None:
    """Why this machine cannot run the server (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (namespaces, ganesha)"
    missing = [t for t in TOOLS if shutil.which(t) is None and
               shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        return (f"needs {', '.join(missing)} (apt-get install nfs-ganesha nfs-ganesha-vfs "
                "rpcbind)")
    if not Path(GANESHA_FSAL).exists():
        return "needs ganesha's VFS backend (apt-get install nfs-ganesha-vfs)"
    from kvmrun.storage.nfs import userspace_driver
    if userspace_driver():
        return f"needs {userspace_driver()}"
    return None


class NfsServer:
    def __init__(self, base: Path, squash: str = "No_Root_Squash"):
        self.base = Path(base)
        self.export_dir = self.base / "export"
        self.squash = squash
        self.holder: subprocess.Popen | None = None
        self.ganesha_pid: int | None = None
        self.address = "127.0.0.1"     # where clients reach it (see `holder_pid`)

    @property
    def source(self) -> str:
        return f"{self.address}:{EXPORT}"

    @property
    def url(self) -> str:
        return f"nfs://{self.address}{EXPORT}"

    @property
    def holder_pid(self) -> int:
        """A process in the server's network namespace: give it an interface (and set
        `address`) to serve clients in other namespaces; rpcbind and ganesha bind every
        address, so one added later serves too."""
        return self.holder.pid

    def start(self) -> "NfsServer":
        self.export_dir.mkdir(parents=True, exist_ok=True)
        (self.base / "recov").mkdir(exist_ok=True)
        self._configure(read_only=False)
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, __file__, "--inner", str(self.base)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if not line.startswith("up "):
            self.stop()
            raise RuntimeError(f"NFS server did not come up: {line.strip()} "
                               f"{self._log_tail()}")
        self.ganesha_pid = int(line.split()[1])
        return self

    def _configure(self, read_only: bool) -> None:
        (self.base / "ganesha.conf").write_text(CONFIG.format(
            base=self.base, pseudo=EXPORT, squash=self.squash,
            access="RO" if read_only else "RW"))

    def _ask(self, command: str) -> str:
        self.holder.stdin.write(command + "\n")
        self.holder.stdin.flush()
        reply = self.holder.stdout.readline().strip()
        if not reply.startswith(("up", "down")):
            raise RuntimeError(f"NFS server: {command}: {reply!r} {self._log_tail()}")
        return reply

    def kill_ganesha(self) -> None:
        """The server goes away at once (SIGKILL), as a crash or a power cut would do."""
        self._ask("kill")
        self.ganesha_pid = None

    def start_ganesha(self, read_only: bool = False) -> None:
        """Ganesha back on the same export (read-only: a server that came back wrong)."""
        self._configure(read_only)
        self.ganesha_pid = int(self._ask("start").split()[1])

    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.netns()}", "--", *map(str, argv)]

    def stop(self) -> None:
        if self.holder is None:
            return
        try:
            self.holder.stdin.close()
        except OSError:
            pass
        try:
            self.holder.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.holder.terminate()       # unshare --kill-child takes the namespace along
            try:
                self.holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
        for stream in (self.holder.stdout, self.holder.stderr):
            stream.close()
        self.holder = None

    def _log_tail(self) -> str:
        try:
            return (self.base / "ganesha.log").read_text()[-1500:]
        except OSError:
            return ""

    def __enter__(self) -> "NfsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- inside the namespaces

def _end(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _mountd_listed() -> bool:
    out = subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    return out.returncode == 0 and "mountd" in out.stdout


def _start_ganesha(base: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ganesha.nfsd", "-F", "-f", str(base / "ganesha.conf"), "-L", str(base / "ganesha.log"),
         "-p", "/run/ganesha/ganesha.pid", "-N", "NIV_EVENT"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1000):                # readiness, not timing: about 0.1 s here
        if _mountd_listed():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"ganesha exited ({proc.returncode})")
        time.sleep(0.02)
    _end(proc)
    raise RuntimeError("ganesha never registered mountd with rpcbind")


def inner(base: Path) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/ganesha")
    rpcbind = subprocess.Popen(["rpcbind", "-f", "-w"], stdin=subprocess.DEVNULL)
    ganesha = None
    try:
        for _ in range(500):
            if subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True,
                              stdin=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.02)
        ganesha = _start_ganesha(base)
        print(f"up {ganesha.pid}", flush=True)
        for line in sys.stdin:
            word = line.strip()
            if word == "kill" and ganesha is not None:
                ganesha.kill()
                ganesha.wait()
                ganesha = None
                print("down", flush=True)
            elif word == "stop":
                _end(ganesha)
                ganesha = None
                print("down", flush=True)
            elif word == "start" and ganesha is None:
                ganesha = _start_ganesha(base)
                print(f"up {ganesha.pid}", flush=True)
            else:
                print(f"error: cannot {word!r} now", flush=True)
    except Exception as err:             # reported to the test on stdout
        print(f"error: {err}", flush=True)
        return 1
    finally:
        _end(ganesha)
        _end(rpcbind)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--inner"]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))    # PID 1 gets no default action
    sys.exit(inner(Path(sys.argv[2])))
