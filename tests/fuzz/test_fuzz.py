"""The fuzz target (issue 12): generated profiles through load -> validate -> compile.

    PROFILE_CASES (10,000) profiles of every kind in tests/fuzz/gen.py
    SET_CASES     `--set` assignments laid over a shipped profile
    NUMBER_CASES  strings for the numbers the CLI parses (disk create --size, disk resize)
    regressions/  every case a fuzz run found, replayed each time

Each run draws a new seed (printed; `KVMRUN_FUZZ_SEED=N` replays a run, KVMRUN_FUZZ_CASES
scales it). Pass = every case ends in a result or a located ProfileError, none over 1 s
(tests/fuzz/runner.py runs them in forked batches with a time and a memory limit). A
failing case is written to a temporary file named in the failure: copy it into
regressions/ once it is fixed.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

from tests.fuzz import gen, runner

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
SCALE = float(os.environ.get("KVMRUN_FUZZ_CASES_SCALE", "1"))
PROFILE_CASES = int(10_000 * SCALE)
SET_CASES = int(3_000 * SCALE)
NUMBER_CASES = int(5_000 * SCALE)


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("KVMRUN_FUZZ_SEED") or random.SystemRandom().randrange(1 << 31))
    print(f"\nfuzz seed: {value} (replay with KVMRUN_FUZZ_SEED={value})")
    return value


@pytest.fixture(scope="module")
def host():
    return runner._pin_host()


def report(failures: list[dict], seed: int, what: str, source) -> str:
    """The failures as text, each case saved to a file for replay and for regressions/."""
    out = tempfile.mkdtemp(prefix="kvmrun-fuzz-found-")
    lines = [f"{len(failures)} {what} case(s) failed; seed {seed} "
             f"(replay: KVMRUN_FUZZ_SEED={seed}); cases saved in {out}"]
    for item in failures[:20]:
        saved = Path(out) / f"{what}-{seed}-{item['index']}.yaml"
        saved.write_bytes(source(item["index"]))
        lines.append(f"  case {item['index']}: {item['failure']}  ({saved})")
        if item.get("traceback"):
            lines.append("    " + item["traceback"].strip().replace("\n", "\n    "))
    return "\n".join(lines)


def test_generated_profiles(seed, host):
    def make(index, workdir):
        kind, raw = gen.case(seed, index)
        return lambda: runner.check_profile(raw, [], workdir, host)

    failures, counts, slowest = runner.run(make, list(range(PROFILE_CASES)))
    print(f"profiles: {counts}, slowest {slowest:.3f}s")
    assert not failures, report(failures, seed, "profile", lambda i: gen.case(seed, i)[1])
    assert sum(counts.values()) == PROFILE_CASES
    # the generator reaches every stage: some compile, most are refused with a location
    assert counts.get("compiled", 0) > PROFILE_CASES // 100 and counts.get("profile-error")


def test_generated_set_values(seed, host):
    bases = [p.read_bytes() for p in gen.SEEDS]

    def source(index) -> bytes:
        return bases[index % len(bases)]

    def make(index, workdir):
        sets = gen.set_case(seed, index)
        return lambda: runner.check_profile(source(index), sets, workdir, host)

    failures, counts, slowest = runner.run(make, list(range(SET_CASES)))
    print(f"--set: {counts}, slowest {slowest:.3f}s")
    assert not failures, report(
        failures, seed, "set",
        lambda i: ("# --set " + " --set ".join(gen.set_case(seed, i)) + "\n").encode()
        + source(i))
    assert counts.get("compiled") and counts.get("profile-error")


def test_generated_numbers(seed):
    def make(index, workdir):
        text = gen.number_case(seed, index)
        return lambda: runner.check_number(text)

    failures, counts, slowest = runner.run(make, list(range(NUMBER_CASES)), batch=2500)
    print(f"numbers: {counts}, slowest {slowest:.3f}s")
    assert not failures, report(failures, seed, "number",
                                lambda i: gen.number_case(seed, i).encode())


@pytest.mark.parametrize("case", sorted(REGRESSIONS.glob("*.yaml")), ids=lambda p: p.name)
def test_regressions(case, host, tmp_path):
    """A case a fuzz run (or the red-team pass) found stays fixed: a `# --set A` first line
    lays those assignments over the rest."""
    raw = case.read_bytes()
    first = raw.split(b"\n", 1)[0].decode(errors="replace")
    sets = first.removeprefix("# --set ").split(" --set ") if first.startswith("# --set ") \
        else []
    failures, counts, slowest = runner.run(
        lambda i, workdir: (lambda: runner.check_profile(raw, sets, workdir, host)), [0])
    assert not failures, failures


def test_the_runner_reports_crashes_hangs_and_dead_batches():
    """The harness itself can fail: an exception, a case over the CPU limit and a batch
    whose child dies are each reported (so a green fuzz run means something)."""
    def make(index, workdir):
        def crash():
            raise KeyError("boom")

        def spin():
            while True:
                pass
        return {0: crash, 1: spin, 2: lambda: os._exit(9), 3: lambda: "ok"}[index]

    failures, counts, slowest = runner.run(make, [0, 1, 3], batch=10)
    reasons = {f["index"]: f["failure"] for f in failures}
    assert reasons[0].startswith("KeyError") and "more than 1s" in reasons[1]
    assert counts == {"ok": 1}
    failures, counts, _ = runner.run(make, [2], batch=10)
    assert len(failures) == 1 and "died" in failures[0]["failure"]
