"""Runs fuzz cases in forked batches: one child per batch, so a case that corrupts the
interpreter (or leaks memory) cannot poison the next batch; each child has an address-space
limit (MEMORY_LIMIT) and every case a time limit (CASE_LIMIT seconds of CPU time, an
ITIMER_PROF timer: on a shared 2-core machine wall time would measure the neighbours; a
batch that stops making progress is killed by the wall-clock deadline in `run`).

A case passes when it ends in a result (a profile that compiles, or a clean kvmrun error
from the compile step such as missing firmware) or in a ProfileError that names its file,
within the time limit. Anything else -- another exception, a ProfileError without a
location, a timeout, a child that dies -- is a failure, reported with its seed and index
so `KVMRUN_FUZZ_SEED=SEED` replays the run (and `replay(kind, seed, index)` the case).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

CASE_LIMIT = 1.0                      # CPU seconds a case may take
MEMORY_LIMIT = 1536 * 1024 * 1024     # bytes of address space a batch may use
WORKERS = 2


class CaseTimeout(BaseException):
    """Raised by the interval timer inside a case that ran out of time."""


def _alarm(signum, frame):
    raise CaseTimeout()


def _pin_host() -> tuple:
    """The compile step's host, pinned as in the golden tests (x86_64, KVM, UEFI paths)."""
    from kvmrun import arch as archmod
    from kvmrun.qemu.compile import HostFacts
    archmod.host_machine = lambda: "x86_64"
    uefi = {"x86_64": "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "aarch64": "/usr/share/AAVMF/AAVMF_CODE.fd",
            "arm": "/usr/share/AAVMF/AAVMF32_CODE.fd"}
    return HostFacts(machine="x86_64", kvm=True, uefi=uefi)


def check_profile(raw: bytes, sets: list[str], workdir: Path, host) -> str:
    """load -> validate -> compile one case; returns the outcome's name, raises on a bug."""
    from kvmrun.errors import KvmrunError, ProfileError
    from kvmrun.paths import RunPaths
    from kvmrun.profile import load
    from kvmrun.qemu.compile import compile
    path = workdir / "case.yaml"
    path.write_bytes(raw)
    try:
        profile = load(path, sets)
    except ProfileError as err:
        if not err.location.file or not str(err).startswith(err.location.file):
            raise AssertionError(f"profile error without a location: {err!r}") from err
        return "profile-error"
    paths = RunPaths(Path("/run/kvmrun") / profile.name, Path("/var/lib/nvram.fd"))
    try:
        argv = compile(profile, host, paths)
    except ProfileError:
        raise
    except KvmrunError:
        return "host-error"
    if not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise AssertionError(f"argv with a non-string or NUL: {argv!r}")
    return "compiled"


def check_number(text: str) -> str:
    """The numbers the CLI parses: disk sizes (create, resize) and memory sizes (-m)."""
    from kvmrun.errors import StorageError
    from kvmrun.storage.images import parse_disk_size
    outcome = []
    for relative in (False, True):
        try:
            sign, value = parse_disk_size(text, relative)
            assert isinstance(value, int) and value > 0, value
            outcome.append("ok")
        except StorageError as err:
            assert "\n" not in err.message and len(err.message) < 300, err.message
            outcome.append("error")
    return "+".join(outcome)


def _run_batch(cases: Iterable[tuple[int, Callable[[], str]]], wfd: int) -> None:
    """In the child: run each (index, thunk); one JSON line per failure, then a summary."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGPROF, _alarm)
    outcomes: dict[str, int] = {}
    slowest = 0.0

    def send(obj: dict) -> None:
        os.write(wfd, (json.dumps(obj) + "\n").encode())

    for index, thunk in cases:
        started = time.process_time()
        try:
            signal.setitimer(signal.ITIMER_PROF, CASE_LIMIT)
            try:
                outcome = thunk()
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
        except CaseTimeout:
            send({"index": index, "failure": f"took more than {CASE_LIMIT:g}s"})
            continue
        except BaseException as err:      # noqa: BLE001 - every other ending is a bug
            send({"index": index, "failure": f"{type(err).__name__}: {str(err)[:300]}",
                  "traceback": traceback.format_exc()[-1500:]})
            continue
        elapsed = time.process_time() - started
        slowest = max(slowest, elapsed)
        if elapsed > CASE_LIMIT:
            send({"index": index, "failure": f"took {elapsed:.2f}s"})
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    send({"summary": outcomes, "slowest": slowest})


def run(make: Callable[[int, Path], Callable[[], str]], indexes: list[int],
        batch: int = 250) -> tuple[list[dict], dict[str, int], float]:
    """Run `make(index, workdir)()` for every index in forked batches, WORKERS at a time.
    Returns (failures, outcome counts, slowest case in seconds)."""
    batches = [indexes[i:i + batch] for i in range(0, len(indexes), batch)]
    failures: list[dict] = []
    counts: dict[str, int] = {}
    slowest = 0.0
    running: dict[int, tuple[int, list[int], bytes, float]] = {}   # rfd -> (pid, ...)
    with tempfile.TemporaryDirectory(prefix="kvmrun-fuzz-") as tmp:
        while batches or running:
            while batches and len(running) < WORKERS:
                part = batches.pop(0)
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:                                   # the child
                    code = 0
                    try:
                        os.close(rfd)
                        workdir = Path(tmp) / str(os.getpid())
                        workdir.mkdir()
                        _run_batch(((i, make(i, workdir)) for i in part), wfd)
                    except BaseException:                      # noqa: BLE001
                        code = 3
                    finally:
                        os._exit(code)
                os.close(wfd)
                deadline = time.monotonic() + len(part) * CASE_LIMIT * 4 + 120
                running[rfd] = (pid, part, b"", deadline)
            ready, _, _ = select.select(list(running), [], [], 1.0)
            for rfd in list(running):
                pid, part, buf, deadline = running[rfd]
                chunk = os.read(rfd, 1 << 16) if rfd in ready else None
                if chunk:
                    running[rfd] = (pid, part, buf + chunk, deadline)
                    continue
                if chunk is None and time.monotonic() < deadline:
                    continue
                if chunk is None:                               # the batch hung
                    os.kill(pid, signal.SIGKILL)
                os.close(rfd)
                _, status = os.waitpid(pid, 0)
                del running[rfd]
                done = False
                for line in buf.decode(errors="replace").splitlines():
                    item = json.loads(line)
                    if "summary" in item:
                        done = True
                        for k, v in item["summary"].items():
                            counts[k] = counts.get(k, 0) + v
                        slowest = max(slowest, item["slowest"])
                    else:
                        failures.append(item)
                if not done:
                    failures.append({"index": part[0], "failure":
                                     f"the batch of cases {part[0]}..{part[-1]} died "
                                     f"(wait status {status})"})
    return failures, counts, slowest
