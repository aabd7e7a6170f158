#!/usr/bin/env python3
"""kvmrun against raw QEMU, side by side, in one run (`make bench`; never part of `make test`).

Every figure names what it compares, how many runs, and median/min/max. kvmrun and its
baseline alternate (A B A B …) after a warm-up, so a change in machine load hits both.
The guest is the tiny test guest (tests/guest/build.py) under TCG.

    1 start→ready   `kvmrun start PROFILE` (whole process; it returns when the console printed
                    the ready marker) vs Popen of the argv `kvmrun cmdline --json` prints, until
                    the same marker is in its serial log (one reader for both); broken down:
                    ① until QEMU is spawned, ② QEMU spawned → first console output, ③ marker
                    → `kvmrun start` returned; and ① alone for a halted guest (nothing boots)
                    with an unchanged profile (the quick start) and a changed one (the full
                    path), 2 × pairs + 4 of each, interleaved
    2 stop          `kvmrun stop NAME` (whole command) vs bench/raw_stop.py (system_powerdown
                    over QMP, wait on a pidfd); and QEMU's exit (pidfd) → `kvmrun stop` returned
    3 CLI           whole-process wall time of status/list/cmdline/--help vs bench/raw_qmp.py
                    (query-status over QMP) and `python -c 'import typer'`; plus what each verb
                    imports (python -X importtime)
    4 memory        RSS and PSS (/proc/PID/smaps_rollup) of the supervisor, 1 and 20 guests,
                    then of as many bare interpreters once the guests are gone; PSS of 20
                    supervisors started by quick starts (forked, then handed over); an idle
                    supervisor's wake-ups (context switches) and CPU ticks over 60 s of a
                    ready guest, after a full-path and a quick start (--idle-seconds)
    5 scale         N guests started at once until all ready, vs N raw QEMUs at once, each
                    run: raw, changed profiles (the full path), the same again (the quick
                    start), raw first in even runs and last in odd ones (--scale-runs); the
                    median guest's own time to ready (one straggler sets "all ready"); the
                    CPU every side used until all were ready (QEMUs, supervisors, start
                    commands; the rest of the machine's load and its steal beside it); `kvmrun
                    list --json` with N running; stopping all N with N `kvmrun stop NAME` at
                    once (full path runs) and with one `kvmrun stop NAME…` (quick start
                    runs) (--guests N, default 50)
    K KVM           section 1 under KVM where a bounded probe (kvmrun.qemu.kvmprobe) shows
                    that KVM boots guests; else one row "skipped: KVM does not boot guests
                    here"

Results: a table on stdout and bench/results/latest.json. Everything runs in an isolated
directory /tmp/kb-XXXX (KVMRUN_RUN_DIR etc.); every process the benchmark starts, or that
kvmrun started for it, is killed at the end (also on Ctrl-C or an error), identified by PID,
start time and the benchmark's directory in its command line, never by name.

Usage: python bench/run.py [--pairs N] [--cli-runs N] [--guests N] [--quick] [--only 1,3,K]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BENCH = REPO / "bench"
PY = sys.executable
KVMRUN = str(Path(PY).parent / "kvmrun") if (Path(PY).parent / "kvmrun").exists() else None
MARKER = b"KVMRUN-GUEST-READY"
POLL = 0.005             # seconds between looks at serial logs and processes (both sides)
SMALL = "128M"           # the small guests (the brief said 64 MiB): in 64 MiB the tiny
                         # guest's kernel resets before printing anything, and in 96 MiB its
                         # power-button handler is OOM-killed now and then


# ---------------------------------------------------------------- statistics

def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)} if values else {"median": None, "min": None, "max": None, "n": 0}


def fmt(s: dict, unit: str) -> str:
    if not s or s.get("median") is None:
        return "-"
    scale, suffix, digits = {"s": (1, " s", 2), "ms": (1000, " ms", 1),
                             "MiB": (1, " MiB", 2), "/s": (1, " /s", 2),
                             "ticks": (1, " ticks", 0)}[unit]
    if unit == "ms" and s["median"] * 1000 >= 1000:
        scale, suffix, digits = 1, " s", 2
    v = [s[k] * scale for k in ("median", "min", "max")]
    return f"{v[0]:.{digits}f}{suffix} ({v[1]:.{digits}f}–{v[2]:.{digits}f})"


# ---------------------------------------------------------------- processes

def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] is the state, [11] utime, [19] start."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def starttime(pid: int) -> int | None:
    try:
        return int(stat_fields(pid)[19])
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def kill_identified(pid: int, start: int | None, marker: str) -> bool:
    """SIGKILL pid through a pidfd, only if it still is the process recorded (same start
    time, `marker` in its command line)."""
    if not pid or start is None:
        return False
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if starttime(pid) != start or marker not in cmdline(pid):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], 10)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


class Bench:
    """One isolated environment: directories, profiles, and every process started."""

    def __init__(self, guest, keep: bool = False, accel: str = "tcg"):
        self.base = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
        self.run_dir = self.base / "run"          # kvmrun's guests
        self.raw_dir = self.base / "raw"          # raw QEMUs (same layout, no kvmrun)
        self.guest = guest
        self.keep = keep
        self.accel = accel
        self.children: list[subprocess.Popen] = []
        self.env = {**os.environ, "KVMRUN_RUN_DIR": str(self.run_dir),
                    "KVMRUN_CONFIG_DIR": str(self.base / "config"),
                    "KVMRUN_DATA_DIR": str(self.base / "data"),
                    "KVMRUN_CACHE_DIR": str(self.base / "cache"),
                    "KVMRUN_ACCEL": accel}
        for var in ("NOTIFY_SOCKET", "KVMRUN_DEBUG", "WATCHDOG_USEC"):
            self.env.pop(var, None)
        self.raw_env = {**self.env, "KVMRUN_RUN_DIR": str(self.raw_dir)}
        self._argv_cache: dict[str, list[str]] = {}

    # ------------------------------------------------------------ profiles
    def profile(self, name: str, memory: str = "256M", halted: bool = False,
                tag: str = "") -> Path:
        """The tiny guest's profile; `halted`: its vCPUs stopped (nothing boots), `tag`: a
        word on its kernel command line (a new tag is a changed profile: the full path)."""
        data = {"name": name, "accel": self.accel, "memory": memory,
                "kernel": {"path": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                           "append": f"console={self.guest.console} quiet no_timer_check"
                                     + (f" {tag}" if tag else "")},
                "network": [], "ready": {"console": MARKER.decode(), "timeout": 900},
                "shutdown": {"timeout": 180}, **({"halted": True} if halted else {})}
        path = self.base / f"{name}.yaml"
        text = json.dumps(data, indent=1)               # JSON is YAML
        if not path.exists() or path.read_text() != text:   # rewriting it would change its
            path.write_text(text)                           # stamp: no quick start then
        return path

    def raw_argv(self, name: str, memory: str = "256M") -> list[str]:
        """The very argv `kvmrun cmdline --json` prints, with paths in the raw directory."""
        key = f"{name}/{memory}"
        if key not in self._argv_cache:
            out = subprocess.run([KVMRUN, "cmdline", str(self.profile(name, memory)), "--json"],
                                 env=self.raw_env, capture_output=True, text=True, check=True)
            self._argv_cache[key] = json.loads(out.stdout)
        return self._argv_cache[key]

    # ------------------------------------------------------------ processes
    def popen(self, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, env=env or self.env, cwd=self.base, **kwargs)
        self.children.append(proc)
        return proc

    def kvmrun(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([KVMRUN, *map(str, args)], env=self.env, cwd=self.base,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"kvmrun {' '.join(map(str, args))} failed "
                               f"({result.returncode}): {result.stderr.strip()}")
        return result

    def state(self, name: str) -> dict:
        try:
            return json.loads((self.run_dir / name / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_raw(self, name: str, memory: str = "256M") -> subprocess.Popen:
        argv = self.raw_argv(name, memory)
        gdir = self.raw_dir / name
        gdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in gdir.iterdir():            # the serial log appends: start clean
            leftover.unlink()
        log = open(gdir / "qemu.log", "wb")
        try:
            return self.popen(argv, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
        finally:
            log.close()

    def cleanup(self) -> list[int]:
        """Kill every process still running that this benchmark started (directly, or
        through kvmrun: QEMUs and supervisors recorded in its guests' state.json)."""
        killed = []
        for proc in self.children:
            if proc.poll() is None:
                killed.append(proc.pid)
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for attempt in range(3):                 # a supervisor may be launching QEMU still
            found = False
            for state_file in self.run_dir.glob("*/state.json"):
                try:
                    st = json.loads(state_file.read_text())
                except (OSError, ValueError):
                    continue
                for pid_key, start_key in (("supervisor_pid", "supervisor_starttime"),
                                           ("qemu_pid", "qemu_starttime")):
                    if kill_identified(st.get(pid_key), st.get(start_key), str(self.base)):
                        killed.append(st[pid_key])
                        found = True
            if not found and attempt:
                break
            time.sleep(0.3)
        return killed

    def close(self) -> list[int]:
        previous = {sig: signal.signal(sig, signal.SIG_IGN)     # a second Ctrl-C or TERM
                    for sig in (signal.SIGINT, signal.SIGTERM)}  # must not cut this short
        try:
            killed = self.cleanup()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        return killed


class LogWatch:
    """Finds the ready marker in a serial log; the same reader for kvmrun and raw QEMU."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.tail = b""
        self.first_at: float | None = None          # perf_counter() of the first output

    def seen(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return False
        if chunk and self.first_at is None:
            self.first_at = time.perf_counter()
        self.offset += len(chunk)
        self.tail = (self.tail + chunk)[-4096:]
        return MARKER in self.tail


def pidfd_of(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


# ---------------------------------------------------------------- 1 + 2: start and stop

def kvmrun_start_stop(b: Bench, name: str) -> dict:
    prof = b.profile(name)
    log = b.run_dir / name / "serial.log"
    log.unlink(missing_ok=True)              # the last run's log (with its marker) stays
    watch = LogWatch(log)
    t0, t0_wall = time.perf_counter(), time.time()
    proc = b.popen([KVMRUN, "start", str(prof)], stderr=subprocess.PIPE)
    marker_at = None
    while proc.poll() is None:
        if marker_at is None and watch.seen():
            marker_at = time.perf_counter()
        time.sleep(POLL)
    returned = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"kvmrun start failed ({proc.returncode}): "
                           f"{proc.stderr.read().decode(errors='replace').strip()}")
    proc.stderr.close()
    if marker_at is None and watch.seen():
        marker_at = returned
    st = b.state(name)
    spawn = st["started_at"] - t0_wall       # the supervisor's clock, just before its Popen
    first = (watch.first_at or returned) - t0
    qemu_fd = pidfd_of(st["qemu_pid"])
    t1 = time.perf_counter()
    stop = b.popen([KVMRUN, "stop", name])
    stop_fd = pidfd_of(stop.pid)
    exited, stopped = exit_times(qemu_fd, stop_fd, "kvmrun stop")
    if stop.wait() != 0:
        raise RuntimeError(f"kvmrun stop failed ({stop.returncode})")
    marker = (marker_at or returned) - t0
    return {"ready": returned - t0, "marker": marker, "spawn": spawn, "first": first - spawn,
            "returned_after_marker": returned - t0 - marker,
            "stop": stopped - t1, "qemu_exit": exited - t1, "exit_to_return": stopped - exited}


def spawn_times(b: Bench, runs: int, note) -> tuple[list[float], list[float]]:
    """Row ① for both ways of starting, on a halted guest (QEMU waits with its vCPUs
    stopped, so nothing boots and the start returns once QMP answers; killed after each):
    `kvmrun start` launched → the supervisor's timestamp just before QEMU's spawn, for an
    unchanged profile (the quick start) and one changed before each start (the full path),
    interleaved after a warm-up of each."""
    note(f"start ①, halted: {runs} quick starts and {runs} full-path starts, interleaved …")
    times: dict[str, list[float]] = {"quick": [], "full": []}
    for i in range(runs + 1):
        for way in (("quick", "full") if i % 2 == 0 else ("full", "quick")):
            name = f"sp{way}"
            prof = b.profile(name, SMALL, halted=True, tag=f"run{i}" if way == "full" else "")
            t0_wall = time.time()
            b.kvmrun("start", prof)
            spawn = b.state(name)["started_at"] - t0_wall
            b.kvmrun("kill", name)
            if i:                                             # the first: the warm-up
                times[way].append(spawn)
    return times["quick"], times["full"]


def exit_times(qemu_fd: int, stop_fd: int, what: str) -> tuple[float, float]:
    """perf_counter() times at which QEMU and the stop command exited (pidfds, closed)."""
    exited = stopped = None
    try:
        while exited is None or stopped is None:
            fds = [fd for fd, t in ((qemu_fd, exited), (stop_fd, stopped)) if t is None]
            readable = select.select(fds, [], [], 600)[0]
            now = time.perf_counter()
            if not readable:
                raise RuntimeError(f"{what} did not finish in 600 s")
            if qemu_fd in readable and exited is None:
                exited = now
            if stop_fd in readable and stopped is None:
                stopped = now
    finally:
        os.close(qemu_fd)
        os.close(stop_fd)
    return exited, stopped


def raw_start_stop(b: Bench, name: str) -> dict:
    watch = LogWatch(b.raw_dir / name / "serial.log")
    b.raw_argv(name)                                    # compiled before the clock starts
    t0 = time.perf_counter()
    qemu = b.start_raw(name)
    spawn = time.perf_counter() - t0
    while not watch.seen():
        if qemu.poll() is not None:
            raise RuntimeError(f"raw QEMU exited ({qemu.returncode}); see "
                               f"{b.raw_dir / name / 'qemu.log'}")
        time.sleep(POLL)
    ready = time.perf_counter() - t0
    qemu_fd = pidfd_of(qemu.pid)
    t1 = time.perf_counter()
    stop = b.popen([PY, str(BENCH / "raw_stop.py"), str(b.raw_dir / name / "qmp-cli.sock"),
                    str(qemu.pid), "300"])
    stop_fd = pidfd_of(stop.pid)
    exited, stopped = exit_times(qemu_fd, stop_fd, "raw stop")
    qemu.wait()
    if stop.wait() != 0:
        raise RuntimeError(f"raw stop script failed ({stop.returncode})")
    first = (watch.first_at or time.perf_counter()) - t0
    return {"ready": ready, "marker": ready, "spawn": spawn, "first": first - spawn,
            "returned_after_marker": 0.0, "stop": stopped - t1, "qemu_exit": exited - t1,
            "exit_to_return": stopped - exited}


def bench_start_stop(b: Bench, pairs: int, note) -> list[dict]:
    note(f"start→ready and stop: warm-up, then {pairs} pairs (kvmrun, raw) …")
    kvmrun_start_stop(b, "ss")
    raw_start_stop(b, "ss")
    k: list[dict] = []
    r: list[dict] = []
    for i in range(pairs):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):   # A B, B A: neither always first
            if side == 0:
                k.append(kvmrun_start_stop(b, "ss"))
            else:
                r.append(raw_start_stop(b, "ss"))
        note(f"  pair {i + 1}/{pairs}: kvmrun ready {k[-1]['ready']:.2f}s stop "
             f"{k[-1]['stop']:.2f}s | raw ready {r[-1]['ready']:.2f}s stop {r[-1]['stop']:.2f}s")
    quick, full = spawn_times(b, 2 * pairs + 4, note)
    col = lambda rows, key: [row[key] for row in rows]  # noqa: E731
    return [
        row("start→ready", "`kvmrun start` returned (ready)", "raw QEMU: marker in serial log",
            col(k, "ready"), col(r, "ready"), "s", "ratio ≤ 1.02", lambda q: q <= 1.02),
        row("start→marker", "marker in serial log under kvmrun start",
            "raw QEMU: marker in serial log", col(k, "marker"), col(r, "marker"), "s", None),
        row("start ①: until QEMU is spawned", "`kvmrun start` launched → its supervisor "
            "runs QEMU (unchanged profile: the quick start)", "raw: Popen of QEMU",
            col(k, "spawn"), col(r, "spawn"), "ms", "kvmrun ≤ 50 ms",
            absolute=lambda ks, rs: ks["median"] <= 0.050),
        row("start ①, halted guest, unchanged profile (the quick start)", "`kvmrun start` "
            "launched → its supervisor runs QEMU", "raw: Popen of QEMU", quick,
            col(r, "spawn"), "ms", "kvmrun ≤ 50 ms",
            absolute=lambda ks, rs: ks["median"] <= 0.050),
        row("start ①, halted guest, changed profile (the full path)", "`kvmrun start` "
            "launched → its supervisor runs QEMU", "raw: Popen of QEMU", full,
            col(r, "spawn"), "ms", "kvmrun ≤ 100 ms",
            absolute=lambda ks, rs: ks["median"] <= 0.100),
        row("start ②: QEMU spawned → first console output", "under kvmrun's supervisor "
            "(console chardev with logfile=)", "raw QEMU (the same argv)", col(k, "first"),
            col(r, "first"), "s", None),
        row("start ③: marker → `kvmrun start` returned", "the supervisor sees the marker, "
            "tells the CLI, the CLI prints and exits", "-", col(k, "returned_after_marker"), [],
            "ms", None),
        row("stop", "`kvmrun stop` (whole command)", "raw_stop.py: system_powerdown + pidfd",
            col(k, "stop"), col(r, "stop"), "s", None),
        row("stop: QEMU exit → returned", "`kvmrun stop` returned after QEMU's exit",
            "raw_stop.py returned after QEMU's exit", col(k, "exit_to_return"),
            col(r, "exit_to_return"), "ms", "≤ raw + 20 ms",
            absolute=lambda ks, rs: ks["median"] <= rs["median"] + 0.020),
    ]


def row(measure, what, baseline, kv, raw, unit, target, check=None, absolute=None) -> dict:
    ks, rs = stats(kv), stats(raw)
    ratio = (ks["median"] / rs["median"]) if raw and rs["median"] else None
    met = None
    if absolute is not None:
        met = bool(absolute(ks, rs))
    elif check is not None and ratio is not None:
        met = bool(check(ratio))
    return {"measure": measure, "kvmrun": what, "baseline": baseline, "unit": unit,
            "kvmrun_stats": ks, "baseline_stats": rs, "ratio": ratio, "target": target,
            "met": met}


# ---------------------------------------------------------------- 3: CLI round trips

def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


IMPORT_WATCH = ("pydantic", "yaml", "psutil", "rich", "asyncio", "qemu", "kvmrun.profile",
                "kvmrun.qemu.compile", "kvmrun.storage.disks", "kvmrun.ops.defined",
                "kvmrun.qemu.host", "kvmrun.net.nics", "kvmrun.ops.launch", "subprocess")


def imports_of(args: list[str], env: dict) -> dict:
    """Modules a kvmrun verb imports (python -X importtime), and their summed self time: as
    the console script runs it (kvmrun.cli.quick serves some verbs before typer)."""
    code = "import sys; sys.argv[0] = 'kvmrun'; from kvmrun.cli.quick import main; main()"
    proc = subprocess.run([PY, "-X", "importtime", "-c", code, *args], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    mods, total = [], 0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            self_us, _, name = line[len("import time:"):].split("|")
            mods.append(name.strip())
            total += int(self_us)
    return {"modules": len(mods), "import_self_ms": round(total / 1000, 1),
            "kvmrun_modules": sorted(m for m in mods if m.startswith("kvmrun")),
            "heavy": sorted({w for w in IMPORT_WATCH if w in mods})}


def bench_cli(b: Bench, runs: int, note) -> tuple[list[dict], dict]:
    note(f"CLI round trips: {runs} rounds, order rotated …")
    prof = b.profile("cli", SMALL)
    b.kvmrun("start", prof)
    sock = str(b.run_dir / "cli" / "qmp-cli.sock")
    cases = {
        "status": [KVMRUN, "status", "cli", "--json"],
        "list": [KVMRUN, "list", "--json"],
        "cmdline": [KVMRUN, "cmdline", str(prof)],
        "help": [KVMRUN, "--help"],
        "raw_qmp": [PY, str(BENCH / "raw_qmp.py"), sock],
        "import_typer": [PY, "-c", "import typer"],
        "python": [PY, "-c", "pass"],
    }
    for argv in cases.values():                          # warm-up (page cache, pyc)
        timed(argv, b.env)
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(runs):
        shift = i % len(names)
        for k in names[shift:] + names[:shift]:
            times[k].append(timed(cases[k], b.env))
    imports = {verb: imports_of(args, b.env) for verb, args in (
        ("status", ["status", "cli", "--json"]), ("list", ["list", "--json"]),
        ("cmdline", ["cmdline", str(prof)]), ("--help", ["--help"]))}
    b.kvmrun("kill", "cli")
    floor = "`python -c 'import typer'`"
    rows = [
        row("CLI: status --json", "`kvmrun status NAME --json`", floor, times["status"],
            times["import_typer"], "ms", "ratio ≤ 1.15", lambda q: q <= 1.15),
        row("CLI: list --json", "`kvmrun list --json` (1 guest)", floor, times["list"],
            times["import_typer"], "ms", "ratio ≤ 1.15", lambda q: q <= 1.15),
        row("CLI: cmdline", "`kvmrun cmdline PROFILE`", floor, times["cmdline"],
            times["import_typer"], "ms", None),
        row("CLI: --help", "`kvmrun --help`", floor, times["help"], times["import_typer"],
            "ms", None),
        row("CLI: status vs raw QMP", "`kvmrun status NAME --json`",
            "raw_qmp.py: query-status over QMP", times["status"], times["raw_qmp"], "ms", None),
        row("floor: import typer", "`python -c 'import typer'`", "`python -c pass`",
            times["import_typer"], times["python"], "ms", None),
    ]
    return rows, imports


# ---------------------------------------------------------------- 4: memory

def smaps(pid: int) -> dict:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(rest.split()[0]) / 1024     # MiB
    return values


def how_started(pid: int) -> str:
    """How a supervisor came to be: forked by `kvmrun start` and still that process (its
    command line is the `kvmrun start` that forked it), forked and then handed over to a
    lean interpreter once QEMU was spawned (`… --adopt QEMU_PID`: every start since round
    four), or exec'd (`python -I -S -c …supervisor…` without --adopt: the full path before
    round four, a migration's target)."""
    line = cmdline(pid)
    if " -c " not in line:
        return "forked"
    return "handed over" if " --adopt " in line else "exec'd"


def start_all(b: Bench, names: list[str]) -> None:
    """A plain `kvmrun start PROFILE` of each at once, until all returned (ready)."""
    procs = {n: b.popen([KVMRUN, "start", str(b.profile(n, SMALL))]) for n in names}
    wait_all({}, procs, "kvmrun start")


def bench_memory(b: Bench, counts: list[int], note) -> list[dict]:
    rows = []
    for count in counts:
        note(f"memory: {count} guest(s) of {SMALL}, and {count} bare interpreters …")
        names = [f"m{count}-{i}" for i in range(count)]
        for name in names:      # each group measured alone: the interpreter's pages that
            b.kvmrun("start", b.profile(name, SMALL), "--no-wait-ready")   # the supervisors
        time.sleep(3)           # share with bare interpreters running beside them would
        sup = [smaps(b.state(n)["supervisor_pid"]) for n in names]   # lower their PSS
        for name in names:
            b.kvmrun("kill", name)
        bare = [b.popen([PY, "-c", "import time; time.sleep(600)"]) for _ in range(count)]
        time.sleep(3)
        floor = [smaps(p.pid) for p in bare]
        for p in bare:
            p.kill()
            p.wait()
        for key in ("pss", "rss"):
            target = "≤ 6 MiB PSS per guest" if key == "pss" and count >= 20 else None
            rows.append(row(f"memory: supervisor {key.upper()}, {count} guest(s)",
                            f"{key.upper()} per supervisor ({count} running)",
                            f"{key.upper()} of a bare `python -c sleep` ({count} running)",
                            [s[key] for s in sup], [s[key] for s in floor], "MiB", target,
                            absolute=(lambda ks, rs: ks["median"] <= 6.0) if target else None))
    return rows


def bench_forked_memory(b: Bench, count: int, note) -> list[dict]:
    """PSS of supervisors started by quick starts (how an unchanged profile starts): forked
    by `kvmrun start`, they hand over to a lean interpreter once QEMU is spawned (until
    then they kept the pages of the `kvmrun start` that forked them). The first plain start
    of new profiles takes the full path and caches the launch; the second is the quick
    start."""
    names = [f"f{count}-{i}" for i in range(count)]
    note(f"memory: {count} guests started twice (full path, then quick start) …")
    start_all(b, names)
    for name in names:
        b.kvmrun("kill", name)
    start_all(b, names)
    time.sleep(3)
    pids = [b.state(n)["supervisor_pid"] for n in names]
    sup = [smaps(pid) for pid in pids]
    hows = [how_started(pid) for pid in pids]
    said = ", ".join(f"{hows.count(h)} {h}" for h in dict.fromkeys(hows))
    for name in names:
        b.kvmrun("kill", name)
    return [row(f"memory: supervisor PSS, {count} guests, quick-started",
                f"PSS per supervisor ({count} running, started by quick starts: {said})",
                "-", [s["pss"] for s in sup], [], "MiB", "≤ 6 MiB PSS per guest",
                absolute=lambda ks, rs: ks["median"] <= 6.0)]


def proc_counters(pid: int) -> tuple[int, int]:
    """(context switches, CPU ticks) of a process so far: every wake-up from a sleep is a
    voluntary switch."""
    switches = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            switches += int(line.split()[1])
    return switches, cpu_ticks(pid)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process so far, in clock ticks."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def bench_idle(b: Bench, seconds: float, note) -> list[dict]:
    """What a supervisor does while its guest runs and is quiet (no watchdog): its
    wake-ups and CPU over `seconds`, after a full-path start and after a quick start."""
    rows = []
    for how in ("full path", "quick start"):      # a new profile, then the same again
        note(f"idle: one ready guest ({how}), its supervisor over {seconds:g} s …")
        b.kvmrun("start", b.profile("idle", SMALL))
        pid = b.state("idle")["supervisor_pid"]
        was = how_started(pid)
        time.sleep(5)                                  # the boot's last console lines
        s0, t0 = proc_counters(pid)
        time.sleep(seconds)
        s1, t1 = proc_counters(pid)
        b.kvmrun("kill", "idle")
        what = f"over {seconds:g} s of a ready, quiet guest (its supervisor {was})"
        rows.append(row(f"idle supervisor: wake-ups/s ({how})", f"context switches/s {what}",
                        "-", [(s1 - s0) / seconds], [], "/s", "0 /s (no watchdog)",
                        absolute=lambda ks, rs: ks["median"] == 0))
        rows.append(row(f"idle supervisor: CPU ticks ({how})", f"utime+stime ticks {what}",
                        "-", [t1 - t0], [], "ticks", None))
    return rows


# ---------------------------------------------------------------- 5: scale

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """CPU seconds (utime + stime) a live process has used so far; 0 if it is gone."""
    try:
        return cpu_ticks(pid) / TICK
    except (OSError, TypeError):
        return 0.0


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (the `kvmrun start` commands)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (not idle, not waiting on I/O), and
    those its hypervisor took from it (steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields[:7]) - fields[3] - fields[4]) / TICK, fields[7] / TICK


def wait_all(watches: dict, procs: dict, what: str, timeout: float = 3600,
             each: dict | None = None) -> float:
    """Seconds until every watch saw the marker (raw: `procs` are the QEMUs, which must not
    end before it) / every process returned (kvmrun: no watches); `each` gets the moment
    (perf_counter) each name got there."""
    t0 = time.perf_counter()
    pending = set(watches or procs)
    each = {} if each is None else each
    while pending:
        for name in list(pending):
            if watches:
                if watches[name].seen():
                    each[name] = time.perf_counter()
                    pending.discard(name)
                elif procs[name].poll() is not None:
                    raise RuntimeError(f"{what} {name} ended ({procs[name].returncode}) before "
                                       f"its marker; see {watches[name].path.parent}")
            elif procs[name].poll() is not None:
                if procs[name].returncode != 0:
                    raise RuntimeError(f"{what} {name} failed ({procs[name].returncode})")
                each[name] = time.perf_counter()
                pending.discard(name)
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{what}: {len(pending)} not ready after {timeout:g}s")
        time.sleep(POLL * 4)
    return time.perf_counter() - t0


def scale_kvmrun(b: Bench, n: int, tag: str, list_runs: int, one_stop: bool) -> dict:
    """Start N guests at once (a `kvmrun start` each) until all returned, with the CPU every
    process used by then (QEMUs, supervisors, the start commands, and the rest of the
    machine); list them; stop them with N `kvmrun stop NAME` at once, or with one `kvmrun
    stop NAME…` (`one_stop`). A new `tag` is a changed profile (the full path)."""
    names = [f"k{i}" for i in range(n)]
    profs = {name: b.profile(name, SMALL, tag=tag) for name in names}
    (cli0, (busy0, steal0)), each = (children_cpu_s(), machine_cpu_s()), {}
    t0 = time.perf_counter()
    procs, launched = {}, {}
    for name in names:
        launched[name] = time.perf_counter()
        procs[name] = b.popen([KVMRUN, "start", str(profs[name])])
    wait_all({}, procs, "kvmrun start", each=each)
    started = time.perf_counter() - t0
    states = [b.state(name) for name in names]
    qemu = sum(cpu_s(st.get("qemu_pid")) for st in states)
    sup = sum(cpu_s(st.get("supervisor_pid")) for st in states)
    cli = children_cpu_s() - cli0
    busy, steal = (now - then for now, then in zip(machine_cpu_s(), (busy0, steal0)))
    lists = [timed([KVMRUN, "list", "--json"], b.env) for _ in range(list_runs)]
    t0 = time.perf_counter()
    if one_stop:
        stops = {"all": b.popen([KVMRUN, "stop", *names])}
    else:
        stops = {name: b.popen([KVMRUN, "stop", name]) for name in names}
    wait_all({}, stops, "kvmrun stop")
    return {"start": started, "stop": time.perf_counter() - t0, "lists": lists,
            "each": sorted(each[name] - launched[name] for name in names),
            "cpu": {"qemu": qemu, "supervisors": sup, "start_commands": cli,
                    "others": busy - qemu - sup - cli, "steal": steal}}


def scale_raw(b: Bench, n: int) -> dict:
    names = [f"r{i}" for i in range(n)]
    for name in names:
        b.raw_argv(name, SMALL)
    watches = {name: LogWatch(b.raw_dir / name / "serial.log") for name in names}
    (busy0, steal0), each = machine_cpu_s(), {}
    t0 = time.perf_counter()
    qemus, launched = {}, {}
    for name in names:
        launched[name] = time.perf_counter()
        qemus[name] = b.start_raw(name, SMALL)
    wait_all(watches, qemus, "raw QEMU", each=each)
    started = time.perf_counter() - t0
    qemu = sum(cpu_s(q.pid) for q in qemus.values())
    busy, steal = (now - then for now, then in zip(machine_cpu_s(), (busy0, steal0)))
    t0 = time.perf_counter()
    stops = {name: b.popen([PY, str(BENCH / "raw_stop.py"),
                            str(b.raw_dir / name / "qmp-cli.sock"), str(qemus[name].pid), "600"])
             for name in names}
    wait_all({}, stops, "raw stop")
    stopped = time.perf_counter() - t0
    for q in qemus.values():
        q.wait()
    return {"start": started, "stop": stopped,
            "each": sorted(each[name] - launched[name] for name in names),
            "cpu": {"qemu": qemu, "others": busy - qemu, "steal": steal}}


def bench_scale(b: Bench, n: int, runs: int, list_runs: int, note) -> list[dict]:
    """Each run: N raw QEMUs at once; N `kvmrun start` at once of changed profiles (the full
    path), stopped by N `kvmrun stop NAME`; the same profiles again (the quick start),
    stopped by one `kvmrun stop NAME…`. Raw goes first in even runs and last in odd ones."""
    raw, full, quick = [], [], []
    for i in range(runs):
        order = ["raw", "kvmrun"] if i % 2 == 0 else ["kvmrun", "raw"]
        for side in order:
            if side == "raw":
                note(f"scale: {n} raw QEMUs (run {i + 1}/{runs}) …")
                raw.append(scale_raw(b, n))
                continue
            note(f"scale: {n} guests with kvmrun, changed profiles, stopped by {n} commands "
                 f"(run {i + 1}/{runs}) …")
            full.append(scale_kvmrun(b, n, f"scale{i}", list_runs, one_stop=False))
            note(f"scale: {n} guests with kvmrun, unchanged profiles, stopped by one command "
                 f"(run {i + 1}/{runs}) …")
            quick.append(scale_kvmrun(b, n, f"scale{i}", list_runs, one_stop=True))

    def total(r: dict) -> float:
        return sum(r["cpu"][k] for k in ("qemu", "supervisors", "start_commands") if k in r["cpu"])

    def own(r: dict) -> float:
        return r["cpu"]["supervisors"] + r["cpu"]["start_commands"]

    rows = []
    for how, side in (("full path", full), ("quick start", quick)):
        words = "changed" if side is full else "unchanged"
        rows += [
            row(f"scale: start {n}, all ready ({how})", f"{n}× `kvmrun start` at once of "
                f"{words} profiles, until all returned", f"{n} raw QEMUs at once, until all "
                "markers", [r["start"] for r in side], [r["start"] for r in raw], "s",
                "ratio ≤ 1.02", lambda q: q <= 1.02),
            row(f"scale: start {n}, a guest ready ({how})", f"the median of the {n} guests' "
                "own times, its `kvmrun start` launched → returned", "the median of the raw "
                "guests' times, QEMU launched → marker",
                [statistics.median(r["each"]) for r in side],
                [statistics.median(r["each"]) for r in raw], "s", "ratio ≤ 1.02",
                lambda q: q <= 1.02),
            row(f"scale: start {n}, CPU until all ready ({how})", "CPU seconds of the QEMUs, "
                "supervisors and start commands by then", "the raw QEMUs' CPU seconds by then",
                [total(r) for r in side], [total(r) for r in raw], "s", "ratio ≤ 1.02",
                lambda q: q <= 1.02),
            row(f"scale: start {n}, kvmrun's own CPU share ({how})", "the CPU seconds of the "
                "supervisors and start commands until all ready (ratio: their share)",
                "the raw QEMUs' CPU seconds by then", [own(r) for r in side],
                [r["cpu"]["qemu"] for r in raw], "s", "share ≤ 0.02", lambda q: q <= 0.02),
            row(f"scale: start {n}, kvmrun's own CPU per guest ({how})", "CPU of a supervisor "
                "and its start command until all ready", "-", [own(r) / n for r in side], [],
                "ms", None),
        ]
    rows += [
        row(f"scale: list with {n}", f"`kvmrun list --json` with {n} running", "-",
            [t for r in full + quick for t in r["lists"]], [], "ms", "≤ 150 ms",
            absolute=lambda ks, rs: ks["median"] <= 0.150),
        row(f"scale: stop {n}", f"{n}× `kvmrun stop NAME` at once, until all returned",
            f"{n}× raw_stop.py at once", [r["stop"] for r in full], [r["stop"] for r in raw],
            "s", "ratio ≤ 1.2", lambda q: q <= 1.2),
        row(f"scale: stop {n}, one command", f"one `kvmrun stop NAME…` of all {n}",
            f"{n}× raw_stop.py at once", [r["stop"] for r in quick], [r["stop"] for r in raw],
            "s", "ratio ≤ 1.2", lambda q: q <= 1.2),
    ]
    rows[0]["runs"] = {     # every run's CPU split (the others' load and steal included)
        side: [{**x["cpu"], "each": x["each"]} for x in runs]      # and guests' own times
        for side, runs in (("raw", raw), ("full path", full), ("quick start", quick))}
    return rows


# ---------------------------------------------------------------- K: under KVM

def bench_kvm(guest, pairs: int, keep: bool, note) -> list[dict]:
    """Section 1 again under KVM, where KVM boots guests: decided by kvmrun's own bounded
    probe (a kernel booted under KVM must reach its panic within 15 s), not by /dev/kvm
    opening (on nested hosts it opens, and guests hang)."""
    from kvmrun.qemu.kvmprobe import kvm_boot_probe
    note("KVM: probing whether KVM boots a guest here (at most 15 s) …")
    verdict = kvm_boot_probe()
    if not verdict.get("boots"):
        note(f"KVM: skipped ({verdict.get('detail')})")
        skipped = row("KVM: start→ready", "-", "-", [], [], "s", "ratio ≤ 1.02")
        return [{**skipped, "skipped": "skipped: KVM does not boot guests here",
                 "detail": verdict.get("detail")}]
    kb = Bench(guest, keep=keep, accel="kvm")
    try:
        rows = bench_start_stop(kb, pairs, note)
    finally:
        kb.close()
    return [{**r, "measure": "KVM: " + r["measure"]} for r in rows]


# ---------------------------------------------------------------- report

def machine() -> dict:
    def run(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return ""
    import typer
    return {"cpus": os.cpu_count(), "cpu_model": next(
                (line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()),
            "qemu": run("qemu-system-x86_64", "--version").splitlines()[0],
            "python": platform.python_version(), "typer": typer.__version__,
            "git_commit": run("git", "rev-parse", "HEAD"),
            "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
            "kernel": platform.release(), "loadavg_before": os.getloadavg(),
            "dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}


def compile_kvmrun() -> None:
    """Bytecode for every kvmrun module before anything is timed. Without it a module edited
    since its .pyc was written is compiled again by every process that imports it, when
    PYTHONDONTWRITEBYTECODE is set (as on these machines): 3-6 ms a module, every start."""
    if not compileall.compile_dir(str(REPO / "kvmrun"), quiet=1,
                                  rx=re.compile("node_modules")):
        raise SystemExit("bench: cannot compile kvmrun's modules")


def table(rows: list[dict]) -> str:
    lines = ["| measure | kvmrun: median (min–max) | baseline: median (min–max) | n | ratio "
             "| target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['measure']} | {r['skipped']} | | | | {r['target'] or ''} | |")
            continue
        ks, bs = r["kvmrun_stats"], r["baseline_stats"]
        n = f"{ks['n']}" + (f"/{bs['n']}" if bs["n"] else "")
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['measure']} | {fmt(ks, r['unit'])} | {fmt(bs, r['unit'])} | {n} | "
                     f"{ratio} | {r['target'] or ''} | {met} |")
    return "\n".join(lines)


def legend(rows: list[dict]) -> str:
    return "\n".join(f"- {r['measure']}: {r['kvmrun']} vs {r['baseline']}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=10, help="start/stop pairs (default 10)")
    ap.add_argument("--cli-runs", type=int, default=30, help="CLI rounds (default 30)")
    ap.add_argument("--guests", "--scale", dest="scale", type=int, default=50, metavar="N",
                    help="guests started, listed and stopped at once in section 5 (50)")
    ap.add_argument("--scale-runs", type=int, default=1,
                    help="section 5 runs, each raw + full path + quick start (default 1)")
    ap.add_argument("--memory-guests", type=int, default=20, help="the many-guests count (20)")
    ap.add_argument("--idle-seconds", type=float, default=60,
                    help="how long section 4 watches an idle supervisor (60)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 pairs, 5 CLI rounds, memory 1+3, scale 3")
    ap.add_argument("--only", default="1,3,4,5,K",
                    help="sections to run: 1 start/stop, 3 CLI, 4 memory, 5 scale, K section 1 "
                         "under KVM (where KVM boots guests)")
    ap.add_argument("--kvm-pairs", type=int, default=5, help="start/stop pairs under KVM (5)")
    ap.add_argument("--keep", action="store_true", help="keep /tmp/kb-XXXX afterwards")
    ap.add_argument("--output", default=str(BENCH / "results" / "latest.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.cli_runs, args.scale, args.memory_guests = 2, 5, 3, 3
        args.idle_seconds = 10
    only = {s.strip() for s in args.only.split(",")}
    if KVMRUN is None:
        sys.exit(f"no kvmrun next to {PY}; run with the venv's python (make bench)")
    from tests.guest.build import build_guest
    guest = build_guest("x86_64")
    compile_kvmrun()

    def note(message: str) -> None:
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
        sys.stderr.flush()

    from kvmrun.qemu.host import ensure_qemu_user, qemu_user
    if user := qemu_user():     # the raw side runs `kvmrun cmdline`'s argv, whose -runas
        ensure_qemu_user(user, note)     # user `kvmrun start` would make on a fresh machine

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)     # clean up as on Ctrl-C
    info = machine()
    b = Bench(guest, keep=args.keep)
    note(f"isolated directory {b.base}; {info['cpus']} CPUs, load {info['loadavg_before']}")
    rows: list[dict] = []
    imports: dict = {}
    t_start = time.time()
    try:
        if "1" in only or "2" in only:
            rows += bench_start_stop(b, args.pairs, note)
        if "3" in only:
            cli_rows, imports = bench_cli(b, args.cli_runs, note)
            rows += cli_rows
        if "4" in only:
            rows += bench_memory(b, [1, args.memory_guests], note)
            rows += bench_forked_memory(b, args.memory_guests, note)
            rows += bench_idle(b, args.idle_seconds, note)
        if "K" in only or "k" in only:
            rows += bench_kvm(guest, args.kvm_pairs, args.keep, note)
        if "5" in only:
            rows += bench_scale(b, args.scale, args.scale_runs, max(5, args.cli_runs // 3),
                                note)
    except KeyboardInterrupt:
        note("interrupted: stopping everything the benchmark started")
        return 130
    finally:
        killed = b.close()
        if killed:
            note(f"killed leftover processes: {sorted(set(killed))}")
    info["loadavg_after"] = os.getloadavg()
    info["duration_s"] = round(time.time() - t_start)
    settings = {"pairs": args.pairs, "cli_runs": args.cli_runs, "scale": args.scale,
                "scale_runs": args.scale_runs, "memory_guests": args.memory_guests,
                "idle_seconds": args.idle_seconds,
                "kvm_pairs": args.kvm_pairs,
                "quick": args.quick, "sections": sorted(only),
                "command": "python bench/run.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "settings": settings, "results": rows,
                               "imports": imports}, indent=1, ensure_ascii=False) + "\n")
    print(f"kvmrun vs raw QEMU — {info['cpus']} CPUs ({info['cpu_model']}), {info['qemu']}, "
          f"commit {info['git_commit'][:10]}{' +local changes' if info['git_dirty'] else ''}, "
          f"load {info['loadavg_before'][0]:.1f}→{info['loadavg_after'][0]:.1f}")
    print()
    print(table(rows))
    print()
    print(legend(rows))
    if imports:
        print()
        print("| verb | modules imported | kvmrun modules | heavy ones |")
        print("|---|---|---|---|")
        for verb, imp in imports.items():
            print(f"| `{verb}` | {imp['modules']} | "
                  f"{', '.join(m.removeprefix('kvmrun.') for m in imp['kvmrun_modules'])} | "
                  f"{', '.join(imp['heavy']) or '-'} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
