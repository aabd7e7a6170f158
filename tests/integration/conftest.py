"""Fixtures for the real-QEMU integration tests.

`tiny_guest` / `noacpi_guest`   the tiny test guest (tests/guest/build.py), built once and cached
`kr`                            one isolated kvmrun environment per test: its own short run,
                                config, data and cache directories, a profile writer and a
                                runner for the real CLI (`.venv/bin/kvmrun`) as a subprocess

Clean-up never goes by process name: after each test, the processes whose command line names
the test's own (unique) directory -- its QEMUs and supervisors -- are identified by PID and
start time, then killed through a pidfd, so nothing a failed test started outlives it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))              # for tests.guest.build
KVMRUN = Path(sys.executable).parent / "kvmrun"
if not KVMRUN.exists():
    KVMRUN = REPO / ".venv" / "bin" / "kvmrun"
QEMU = "qemu-system-x86_64"
CLI_TIMEOUT = 240            # seconds any one CLI call may take (2 shared cores, TCG)


# ---------------------------------------------------------------- the tiny guest

def _build(variant: str):
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    from tests.guest.build import GuestBuildError, build_guest
    try:
        return build_guest("x86_64", variant)
    except GuestBuildError as err:
        pytest.skip(f"cannot build the tiny guest: {err}")


@pytest.fixture(scope="session")
def tiny_guest():
    """The default tiny guest: busybox acpid powers it off on the ACPI power button."""
    return _build("default")


@pytest.fixture(scope="session")
def noacpi_guest():
    """The tiny guest without acpid: it ignores the power button."""
    return _build("noacpi")


# ---------------------------------------------------------------- processes

def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def processes_mentioning(marker: str) -> dict[int, int]:
    """{pid: starttime} of the live processes whose command line contains `marker`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if marker in _cmdline(pid):
            start = _starttime(pid)
            if start is not None:
                found[pid] = start
    return found


def wait_for_exits(pids, timeout: float) -> None:
    """Wait up to `timeout` seconds for these processes to exit by themselves, on pidfds
    (an orphan's PID lingers until PID 1 reaps it, ~2 s here)."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            for fd in select.select(fds, [], [], left)[0]:
                fds.remove(fd)
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def kill_identified(pid: int, starttime: int, marker: str) -> None:
    """SIGKILL `pid` only if it is still the process we identified (same start time and
    the marker in its command line); the signal goes through a pidfd, so a PID reused
    between the check and the kill cannot be hit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _starttime(pid) != starttime or marker not in _cmdline(pid):
            return
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], 10)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


# ---------------------------------------------------------------- the environment

class Result(NamedTuple):
    """What a CLI call did; unpacks as (code, out, err)."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:          # shown by pytest when an assertion fails
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


class KvmrunEnv:
    """One test's isolated kvmrun: directories, profiles, and the CLI as a subprocess."""

    def __init__(self, base: Path):
        self.base = base
        self.run_dir = base / "run"
        self.env = {
            **os.environ,
            "KVMRUN_RUN_DIR": str(self.run_dir),
            "KVMRUN_CONFIG_DIR": str(base / "config"),
            "KVMRUN_DATA_DIR": str(base / "data"),
            "KVMRUN_CACHE_DIR": str(base / "cache"),
            "KVMRUN_ACCEL": "tcg",           # /dev/kvm exists here, but guests hang under it
        }
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("KVMRUN_DEBUG", None)
        self.popens: list[subprocess.Popen] = []

    # ------------------------------------------------------------ profiles
    def profile(self, name: str, guest, **keys) -> Path:
        """Write NAME.yaml for the tiny guest; `keys` add to or replace top-level keys."""
        data = {
            "name": name,
            "accel": "tcg",
            "memory": "256M",
            "kernel": {"path": str(guest.kernel), "initrd": str(guest.initrd),
                       "append": f"console={guest.console} quiet"},
            "network": [],
            "ready": {"console": guest.ready_marker, "timeout": 180},
            **keys,
        }
        path = self.base / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def guest_dir(self, name: str) -> Path:
        return self.run_dir / name

    # ------------------------------------------------------------ the CLI
    def argv(self, *args) -> list[str]:
        return [str(KVMRUN), *map(str, args)]

    def run(self, *args, env: dict | None = None, input: str | None = None,
            timeout: float = CLI_TIMEOUT) -> Result:
        """Run `kvmrun ARGS...` to completion; returns (code, stdout, stderr)."""
        proc = subprocess.run(self.argv(*args), env=env or self.env, input=input,
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.base, stdin=None if input is not None
                              else subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        """Start `kvmrun ARGS...` without waiting (killed at teardown if still running)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(*args), env=self.env, cwd=self.base, **kwargs)
        self.popens.append(proc)
        return proc

    def ok(self, *args, **kwargs) -> Result:
        """Run the CLI and insist on exit code 0."""
        result = self.run(*args, **kwargs)
        assert result.code == 0, f"kvmrun {' '.join(map(str, args))} failed:\n{result}"
        return result

    def status(self, name: str) -> dict:
        return json.loads(self.ok("status", name, "--json").out)

    def start(self, profile: Path) -> Result:
        return self.ok("start", profile)

    def wait_state(self, name: str, predicate, timeout: float = 120) -> dict:
        """Poll `status --json` until predicate(info) holds (the supervisor records an end
        a moment after QEMU is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.status(name)
            if predicate(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: status never matched; last: {info}")
            time.sleep(0.5)

    def kill9(self, pid: int) -> None:
        """SIGKILL one of this test's own processes (refuses any other PID)."""
        mine = self.our_processes()
        assert pid in mine, f"pid {pid} is not a process of this test"
        kill_identified(pid, mine[pid], str(self.base))

    def our_processes(self) -> dict[int, int]:
        """{pid: starttime} of this test's QEMUs, supervisors and kvmrun commands."""
        return processes_mentioning(str(self.base))

    # ------------------------------------------------------------ teardown
    def cleanup(self) -> list[int]:
        """Kill whatever this test left running; returns the PIDs it had to kill."""
        leftovers = []
        for proc in self.popens:
            if proc.poll() is None:
                leftovers.append(proc.pid)
                proc.kill()
                proc.wait(timeout=30)
        # A guest's end is in its state a moment before its supervisor has exited (the
        # network released, the interpreter gone): what ends within 5 s was not left running.
        wait_for_exits(self.our_processes(), 5)
        for _ in range(3):                   # a supervisor may respawn nothing, but be sure
            found = self.our_processes()
            if not found:
                break
            for pid, start in found.items():
                leftovers.append(pid)
                kill_identified(pid, start, str(self.base))
        return leftovers


@pytest.fixture
def kr(request):
    """An isolated kvmrun environment under a short /tmp/kr-XXXX directory (unix socket
    paths must stay under 108 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    env = KvmrunEnv(base)
    try:
        yield env
    finally:
        leftovers = env.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    # A passing test must have shut down everything it started.
    if leftovers and not getattr(request.node, "_failed", False):
        pytest.fail(f"the test left processes running: {sorted(set(leftovers))}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        item._failed = True
    return report
from tests.integration.debian_fixtures import debian_guest  # noqa: E402,F401  (the real Debian guest)
