"""Processes: /proc, identity checks, pidfds, and the one funnel for subprocesses.

A PID alone lies after a crash and PID reuse; `identified()` checks that a PID is still the
very process recorded (its start time, not a zombie, and a marker on its command line).
Signals and waits go through pidfds, so they reach only the process identified when the
pidfd was opened. `run()` is how kvmrun runs a short command: stdin from /dev/null, output
captured, a timeout, the argv logged on stderr under `--debug` (KVMRUN_DEBUG=1). Light: the
supervisor and the hub import it.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import sys
from pathlib import Path

from kvmrun.errors import GuestError, HostError

TYPE_CHECKING = False                # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import subprocess

PACKAGES = {"ip": "iproute2", "nft": "nftables", "dnsmasq": "dnsmasq-base",
            "qemu-img": "qemu-utils", "genisoimage": "genisoimage",
            "swtpm_setup": "swtpm-tools"}


def which(program: str, path: str | None = None) -> str | None:
    """`shutil.which(program, path=path)`: the program's path on $PATH (or `path`), or None.
    Not shutil's own: importing shutil loads bz2 and lzma, ~3 ms of every start."""
    def runnable(candidate: str) -> bool:
        return os.access(candidate, os.F_OK | os.X_OK) and not os.path.isdir(candidate)
    if os.path.dirname(program):
        return program if runnable(program) else None
    folders = os.environ.get("PATH", os.defpath) if path is None else path
    if not folders:                          # an empty PATH finds nothing (not the cwd)
        return None
    for folder in dict.fromkeys(folders.split(os.pathsep)):
        candidate = os.path.join(folder, program)
        if runnable(candidate):
            return candidate
    return None


_BOOT_ID: list[str] = []


def boot_id() -> str:
    """This boot of the host (read once per process: it cannot change under us)."""
    if not _BOOT_ID:
        try:
            _BOOT_ID.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        except OSError:
            return ""
    return _BOOT_ID[0]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: [0] is the state (field 3),
    [11] utime, [12] stime, [19] the start time, [21] the RSS in pages."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def starttime(pid: int) -> int | None:
    """The process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def exited(pid: int) -> bool:
    """True for a zombie: it has exited and only waits for its parent to reap it (after a
    supervisor is killed, that parent is init, which may take a while or never do it)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def identified(pid: int | None, start: int | None, marker: str | None = None) -> bool:
    """True only if `pid` is still the very process recorded, alive: same start time, not a
    zombie, and (when a marker is given) a command line containing it."""
    if not pid or start is None or starttime(pid) != start or exited(pid):
        return False
    return marker is None or marker in cmdline(pid)


def usage(pid: int) -> dict:
    """CPU use averaged over the process's lifetime (as ps(1) shows it, so there is no
    sampling interval to sleep through) and its RSS; {} if it is gone."""
    fields = stat_fields(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        cpu = (int(fields[11]) + int(fields[12])) / hz          # utime + stime
        elapsed = uptime - int(fields[19]) / hz                 # since its start time
        return {"cpu_percent": round(100 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
                "rss_mib": round(int(fields[21]) * page / 2**20, 1)}
    except (OSError, ValueError, IndexError, TypeError):
        return {}


def open_pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise GuestError(f"process {pid} is gone") from None


def wait_pidfd(pidfd: int, timeout: float | None) -> bool:
    """Block until the process exits (True) or `timeout` seconds pass (False)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return bool(poller.poll(ms))


def wait_pid(pid: int, timeout: float) -> bool:
    """Wait for any process by PID through a pidfd; True if it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return wait_pidfd(fd, timeout)
    finally:
        os.close(fd)


def terminate(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not wait_pidfd(fd, grace):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            wait_pidfd(fd, grace)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def debug() -> bool:
    return os.environ.get("KVMRUN_DEBUG", "") not in ("", "0")


def log_argv(argv: list[str]) -> None:
    if debug():
        sys.stderr.write(f"kvmrun: debug: run: {shlex.join(argv)}\n")


def run(argv: list[str], *, check: bool = True, input: str | None = None,
        timeout: float = 120, env: dict | None = None,
        what: str | None = None) -> subprocess.CompletedProcess:
    """Run a short command: stdin /dev/null (or `input`), text output captured, a timeout.
    A missing binary or a timeout is a HostError; so is a failure when `check`."""
    import subprocess        # not at the top: status, list and the quick start never run one
    log_argv(argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, input=input,
                              stdin=subprocess.DEVNULL if input is None else None,
                              timeout=timeout, env=env)
    except FileNotFoundError:
        name = os.path.basename(argv[0])
        raise HostError(f"{name} not found",
                        hint=f"install it: apt-get install {PACKAGES.get(name, name)}") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"{what or shlex.join(argv[:3])} did not finish in {timeout:g}s") \
            from None
    if check and proc.returncode != 0:
        raise HostError(f"{what or ' '.join(argv)} failed: "
                        f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc
