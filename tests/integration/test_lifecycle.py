"""The guest lifecycle against real QEMU (TCG): each test boots the tiny guest and drives it
through the installed `kvmrun` command, as a user or a script would.

The `kr` fixture (conftest.py) gives each test its own run directory and kills, by
identified PID, anything a failed test left running.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmrun import proc
from tests.integration.conftest import parent_of, pid_alive
from tests.unit.test_lazy_imports import QUICK_START, heavy, imported_by, ours

SOCKETS = {"qmp.sock", "qmp-cli.sock", "console.sock"}
KEPT = {"state.json", "events.jsonl", "serial.log", "qemu.log"}


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def sockets_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_socket()]


def events(kr, name: str) -> list[dict]:
    text = (kr.guest_dir(name) / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def recorded_state(kr, name: str) -> dict:
    return json.loads((kr.guest_dir(name) / "state.json").read_text())


def qemu_processes(kr) -> list[int]:
    return [pid for pid in kr.our_processes()
            if "qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                errors="replace").split("\0")[0]]


def read_until(stream, wanted: bytes, timeout: float) -> bytes:
    """Read a pipe until `wanted` shows up (or fail after `timeout` seconds)."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r}; got {seen[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"stream ended before {wanted!r}; got {seen[-2000:]!r}"
            seen += chunk
    return seen


# ---------------------------------------------------------------- start, status, stop

def full_cli(kr, *args) -> str:
    """What the typer CLI (kvmrun.cli.entry) prints for `kvmrun ARGS`: `status` and `list`
    are served before it by the console script (kvmrun.cli.quick), and must say the same."""
    proc = subprocess.run([sys.executable, "-c", "from kvmrun.cli.entry import main; main()",
                           *map(str, args)], env=kr.env, cwd=kr.base, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc
    return proc.stdout


@pytest.mark.slow
@pytest.mark.qemu
def test_start_status_stop(kr, tiny_guest):
    profile = kr.profile("g1", tiny_guest, smp=2, memory="320M")

    started = kr.ok("start", profile)
    assert "started g1" in started.out and "ready" in started.out

    info = kr.status("g1")
    assert info["state"] == "running" and info["ready"] is True
    assert info["qemu_status"] == "running"              # only present when QMP answered
    assert info["vcpus"] == 2 and info["memory_mib"] == 320
    assert info["accel"] == "tcg" and info["machine"] == "q35"
    qemu = info["pid"]
    assert pid_alive(qemu) and qemu_processes(kr) == [qemu]
    assert SOCKETS | {"qemu.pid"} <= files(kr.guest_dir("g1"))
    for sock in SOCKETS:                      # private: the run directory and its sockets
        assert stat.S_IMODE((kr.guest_dir("g1") / sock).stat().st_mode) == 0o600, sock
    assert stat.S_IMODE(kr.guest_dir("g1").stat().st_mode) == 0o700

    listed = json.loads(kr.ok("list", "--json").out)
    assert [(g["name"], g["state"], g["pid"]) for g in listed] == [("g1", "running", qemu)]
    moving = {"uptime", "cpu_percent", "rss_mib"}           # change from one call to the next
    full = json.loads(full_cli(kr, "status", "g1", "--json"))
    assert {k: v for k, v in info.items() if k not in moving} == {
        k: v for k, v in full.items() if k not in moving}

    stopped = kr.ok("stop", "g1")
    assert "stopped g1: the guest powered off" in stopped.out
    assert not pid_alive(qemu)

    shutdowns = [e for e in events(kr, "g1") if e["event"] == "SHUTDOWN"]
    assert shutdowns and shutdowns[-1]["data"]["reason"] == "guest-shutdown"

    info = kr.status("g1")
    assert info["state"] == "stopped" and info["pid"] is None
    ended = info["ended"]
    assert ended["reason"] == "stopped" and ended["by"] == "kvmrun stop"
    assert ended["stage"] == "acpi" and ended["shutdown_reason"] == "guest-shutdown"
    assert "ended    stopped by kvmrun stop: the guest powered off" in kr.ok(
        "status", "g1").out
    assert recorded_state(kr, "g1")["supervisor_exit"] == 0
    for args in (["status", "g1"], ["status", "g1", "--json"], ["list"], ["list", "--json"]):
        assert kr.ok(*args).out == full_cli(kr, *args), args    # served before typer

    left = files(kr.guest_dir("g1"))
    assert not left & (SOCKETS | {"qemu.pid", "request.json"}), left
    assert KEPT <= left, left


@pytest.mark.slow
@pytest.mark.qemu
def test_one_stop_of_several_guests(kr, tiny_guest):
    """`kvmrun stop A B C` stops them all at once in one process: a line (a list entry with
    --json) per guest in the order given, a guest that fails does not keep the others
    running, and the exit code is that of the first failure."""
    for name in ("a", "b"):
        kr.start(kr.profile(name, tiny_guest))
    qemus = [kr.status(name)["pid"] for name in ("a", "b")]

    done = kr.run("stop", "b", "nope", "a", "--json")
    assert done.code == 4, done
    results = json.loads(done.out)
    assert [r["name"] for r in results] == ["b", "nope", "a"]
    assert results[0]["stage"] == results[2]["stage"] == "acpi"
    assert results[1]["exit_code"] == 4 and "nope" in results[1]["error"]
    assert "kvmrun: error: nope: " in done.err
    assert not any(pid_alive(q) for q in qemus)
    for name in ("a", "b"):
        info = kr.status(name)
        assert info["state"] == "stopped" and info["ended"]["by"] == "kvmrun stop"

    kr.start(kr.profile("a", tiny_guest))
    kr.start(kr.profile("b", tiny_guest))
    assert kr.ok("stop", "a", "b").out.splitlines() == [
        "stopped a: the guest powered off (shutdown method acpi)",
        "stopped b: the guest powered off (shutdown method acpi)"]


@pytest.mark.slow
@pytest.mark.qemu
def test_kill_is_a_hard_power_off(kr, tiny_guest):
    kr.start(kr.profile("g", tiny_guest))
    qemu = kr.status("g")["pid"]

    result = kr.ok("kill", "g")
    assert result.out.startswith("killed g (")
    assert not pid_alive(qemu)

    info = kr.status("g")
    assert info["state"] == "stopped" and info["ended"]["reason"] == "killed"
    assert "powered off hard by kvmrun kill" in kr.ok("status", "g").out
    assert not any(e["event"] == "SHUTDOWN" and e["data"]["reason"] == "guest-shutdown"
                   for e in events(kr, "g"))
    assert recorded_state(kr, "g")["supervisor_exit"] == 11
    assert not files(kr.guest_dir("g")) & SOCKETS


@pytest.mark.slow
@pytest.mark.qemu
def test_stop_of_a_guest_that_ignores_acpi(kr, noacpi_guest):
    kr.start(kr.profile("deaf", noacpi_guest))
    qemu = kr.status("deaf")["pid"]

    refused = kr.run("stop", "deaf", "--timeout", "5")
    assert refused.code == 5, refused
    assert "did not power off within 5s; it is still running" in refused.err
    assert "kvmrun stop --force" in refused.err                     # the hint says what next
    info = kr.status("deaf")
    assert info["state"] == "running" and info["pid"] == qemu and pid_alive(qemu)

    forced = kr.ok("stop", "deaf", "--timeout", "3", "--force")
    assert "stopped deaf: ended by quit" in forced.out
    assert "sending QMP quit" in forced.err
    assert not pid_alive(qemu)
    info = kr.status("deaf")
    assert info["state"] == "stopped"
    assert info["ended"]["stage"] == "quit" and "escalated to quit" in info["ended"]["detail"]
    assert recorded_state(kr, "deaf")["supervisor_exit"] == 10


@pytest.mark.slow
@pytest.mark.qemu
def test_stop_while_booting_resends_the_power_button(kr, tiny_guest):
    """A guest misses ACPI requests sent before acpid runs; stop keeps asking."""
    kr.ok("start", kr.profile("early", tiny_guest), "--no-wait-ready")   # returns once QMP is up

    assert "stopped early: the guest powered off" in kr.ok("stop", "early").out
    names = [e["event"] for e in events(kr, "early")]
    assert "POWERDOWN" in names and names[-1] == "SHUTDOWN"
    assert events(kr, "early")[-1]["data"]["reason"] == "guest-shutdown"
    assert kr.status("early")["ended"]["stage"] == "acpi"


# ---------------------------------------------------------------- when processes die

@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.parametrize("verb", ["stop", "kill"])
def test_guest_outlives_its_supervisor(kr, tiny_guest, verb):
    kr.start(kr.profile("orphan", tiny_guest))
    info = kr.status("orphan")
    qemu, supervisor = info["pid"], info["supervisor_pid"]
    assert supervisor and supervisor != qemu

    kr.kill9(supervisor)
    assert not pid_alive(supervisor)

    info = kr.status("orphan")
    assert info["state"] == "running" and info["pid"] == qemu
    assert info["supervisor_pid"] is None
    assert info["qemu_status"] == "running"
    assert pid_alive(qemu)

    kr.ok(verb, "orphan")
    assert not pid_alive(qemu)
    info = kr.status("orphan")
    assert info["state"] == "stopped"
    assert info["ended"]["reason"] == {"stop": "stopped", "kill": "killed"}[verb]
    assert "supervisor was not running" in info["ended"]["note"]
    assert not files(kr.guest_dir("orphan")) & (SOCKETS | {"qemu.pid"})


@pytest.mark.slow
@pytest.mark.qemu
def test_qemu_killed_reads_as_crashed_and_can_start_again(kr, tiny_guest):
    profile = kr.profile("g", tiny_guest)
    kr.start(profile)
    qemu = kr.status("g")["pid"]

    kr.kill9(qemu)
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["state"] == "crashed" and info["pid"] is None
    assert info["ended"]["reason"] == "crashed" and info["ended"]["signal"] == 9
    assert "QEMU was killed by signal 9 (SIGKILL)" in kr.ok("status", "g").out
    assert not files(kr.guest_dir("g")) & (SOCKETS | {"qemu.pid"})

    # a start that fails after a crash leaves no sockets behind either
    kr.profile("g", tiny_guest, qemu_args=["-bogus-option"])
    assert kr.run("start", profile).code == 7
    assert not sockets_under(kr.run_dir)

    kr.profile("g", tiny_guest)
    assert "ready" in kr.ok("start", profile).out
    info = kr.status("g")
    assert info["state"] == "running" and info["pid"] != qemu
    kr.ok("kill", "g")


# ---------------------------------------------------------------- refusing to do harm

@pytest.mark.slow
@pytest.mark.qemu
def test_two_concurrent_starts_make_one_guest(kr, tiny_guest):
    profile = kr.profile("twin", tiny_guest)
    first, second = kr.popen("start", profile), kr.popen("start", profile)
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out.decode(), err.decode()))

    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    code, _, err = losers[0]
    assert code in (4, 5), results
    assert "twin is already running" in err or "holds the guest's lock" in err, err

    qemus = qemu_processes(kr)
    assert len(qemus) == 1
    assert kr.status("twin")["pid"] == qemus[0]
    kr.ok("kill", "twin")


@pytest.mark.slow
@pytest.mark.qemu
def test_state_file_pointing_at_an_unrelated_process(kr, tiny_guest):
    kr.start(kr.profile("g", tiny_guest))
    kr.ok("stop", "g")
    state_file = kr.guest_dir("g") / "state.json"
    ended_state = json.loads(state_file.read_text())

    with subprocess.Popen(["sleep", "600"]) as bystander:
        try:
            real_start = int(Path(f"/proc/{bystander.pid}/stat").read_text()
                             .rsplit(")", 1)[1].split()[19])
            for says_running in (False, True):
                for starttime in (real_start, real_start + 4242):
                    fake = {**ended_state, "qemu_pid": bystander.pid,
                            "qemu_starttime": starttime}
                    if says_running:          # a supervisor that died without a word
                        fake.update(state="running", ended=None)
                    state_file.write_text(json.dumps(fake))

                    info = kr.status("g")
                    assert info["pid"] is None
                    if says_running:
                        # QEMU logged how it ended (the stop's QMP quit or power-off):
                        # that, not "crashed", is what status says with nobody's record
                        assert info["state"] == "stopped", info
                        assert "QEMU's log" in info["ended"]["note"]
                        qemu_log = kr.guest_dir("g") / "qemu.log"
                        logged = qemu_log.read_bytes()
                        qemu_log.write_bytes(b"")        # no word from QEMU either
                        info = kr.status("g")
                        qemu_log.write_bytes(logged)
                        assert info["state"] == "crashed"
                        assert info["ended"]["reason"] == "unknown"
                    else:
                        assert info["state"] == "stopped"
                    for verb in ("stop", "kill", "pause"):
                        refused = kr.run(verb, "g")
                        assert refused.code == 4 and "g is not running" in refused.err, refused
                    kr.ok("wait", "g", "--for", "stopped", "--timeout", "5")
                    assert bystander.poll() is None, "kvmrun touched an unrelated process"
        finally:
            bystander.kill()


@pytest.mark.slow
@pytest.mark.qemu
def test_a_disk_in_use_by_another_guest_is_refused(kr, tiny_guest):
    shared = kr.base / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(shared), "16M"], check=True)
    for own in ("a.raw", "b.raw"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(kr.base / own), "4M"],
                       check=True)
    a = kr.profile("a", tiny_guest, disks=[{"path": str(kr.base / "a.raw")},
                                           {"path": str(shared)}])
    b = kr.profile("b", tiny_guest, disks=[{"path": str(kr.base / "b.raw")},
                                           {"path": str(shared)}])
    kr.start(a)
    qemu = kr.status("a")["pid"]

    refused = kr.run("start", b)
    assert refused.code == 4, refused
    assert f"disk {shared} is in use by running guest 'a'" in refused.err
    assert not kr.guest_dir("b").exists()
    assert qemu_processes(kr) == [qemu]

    info = kr.status("a")
    assert info["state"] == "running" and info["qemu_status"] == "running"
    assert [d["file"] for d in info["disks"]] == [str(kr.base / "a.raw"), str(shared)]
    assert "stopped a: the guest powered off" in kr.ok("stop", "a").out


# ---------------------------------------------------------------- launch errors

def _no_qemu_path(kr) -> dict:
    venv_bin = str(Path(os.environ.get("VIRTUAL_ENV", "")) / "bin") if os.environ.get(
        "VIRTUAL_ENV") else str(Path(kr.argv()[0]).parent)
    return {**kr.env, "PATH": venv_bin}


LAUNCH_ERRORS = {
    # case: (profile keys, verb, exit code, texts expected on stderr)
    "no-qemu-binary": ({}, "start", 3, ["qemu-system-x86_64 not found on PATH",
                                        "apt-get install qemu-system-x86"]),
    "missing-disk": ({"disks": [{"path": "{base}/absent.qcow2"}]}, "start", 2,
                     ["absent.qcow2"]),
    "unknown-machine": ({"machine": "pc-bogus-99"}, "start", 2,
                        ["machine type 'pc-bogus-99' is not known"]),
    "qemu-rejects-an-option": ({"qemu_args": ["-bogus-option"]}, "start", 7,
                               ["QEMU failed to start", "qemu said:",
                                "-bogus-option: invalid option", "command: ",
                                "-bogus-option"]),
    "qemu-rejects-an-option-in-run": ({"qemu_args": ["-bogus-option"]}, "run", 7,
                                      ["-bogus-option: invalid option", "command: "]),
}


@pytest.mark.qemu
@pytest.mark.parametrize("case", list(LAUNCH_ERRORS))
def test_launch_errors_are_clear_and_leave_nothing(kr, tiny_guest, case):
    keys, verb, code, texts = LAUNCH_ERRORS[case]
    keys = json.loads(json.dumps(keys).replace("{base}", str(kr.base)))
    profile = kr.profile("bad", tiny_guest, **keys)
    env = _no_qemu_path(kr) if case == "no-qemu-binary" else None

    result = kr.run(verb, profile, env=env)
    assert result.code == code, result
    assert "\nkvmrun: error: " in "\n" + result.err, result
    for text in texts:
        assert text in result.err, result
    assert "Traceback" not in result.err
    assert not kr.guest_dir("bad").exists(), files(kr.guest_dir("bad"))
    assert not sockets_under(kr.base)
    assert not kr.our_processes()


# ---------------------------------------------------------------- the other verbs

@pytest.mark.slow
@pytest.mark.qemu
def test_pause_resume_reset_wait_qmp_console_logs(kr, tiny_guest):
    kr.start(kr.profile("g", tiny_guest))
    marker = tiny_guest.ready_marker

    assert json.loads(kr.ok("qmp", "g", "query-status").out)["status"] == "running"
    assert json.loads(kr.ok("qmp", "g", "query-name").out) == {"name": "g"}
    bad = kr.run("qmp", "g", "no-such-command")
    assert bad.code == 6 and "no-such-command" in bad.err, bad

    assert kr.ok("pause", "g").out == "paused g\n"
    info = kr.status("g")
    assert info["state"] == "paused" and info["qemu_status"] == "paused"
    assert kr.ok("resume", "g").out == "resumed g\n"
    info = kr.status("g")
    assert info["state"] == "running" and info["qemu_status"] == "running"
    assert [e["event"] for e in events(kr, "g")][-2:] == ["STOP", "RESUME"]

    # reset reboots the guest: `wait --for ready` waits for the console marker again
    assert kr.ok("reset", "g").out == "reset g\n"
    kr.ok("wait", "g", "--for", "ready", "--timeout", "180")
    assert kr.ok("logs", "g").out.count(marker) == 2
    assert any(e["event"] == "RESET" for e in events(kr, "g"))
    assert kr.status("g")["ready"] is True

    # the console, through a pipe: type a command, see its output, detach with Ctrl-]
    n = random.randint(1000, 9999)
    console = kr.popen("console", "g", stdin=subprocess.PIPE)
    console.stdin.write(f"echo hello-$(({n}+1))\r".encode())
    console.stdin.flush()
    read_until(console.stdout, f"hello-{n + 1}".encode(), timeout=60)
    console.stdin.write(b"\x1d")
    console.stdin.flush()
    assert console.wait(timeout=30) == 0
    assert "detached" in console.stderr.read().decode()

    tail = kr.ok("logs", "g", "-n", "3").out
    assert f"hello-{n + 1}" in tail and tail.rstrip("\n").count("\n") == 2, repr(tail)
    assert marker not in tail                 # -n really cut the log short
    assert marker in kr.ok("logs", "g").out

    timed_out = kr.run("wait", "g", "--for", "stopped", "--timeout", "1")
    assert timed_out.code == 5 and "still running" in timed_out.err, timed_out
    waiter = kr.popen("wait", "g", "--for", "stopped", "--timeout", "180")
    kr.ok("stop", "g")
    assert waiter.wait(timeout=60) == 0
    assert waiter.stdout.read().decode() == "g stopped\n"
    refused = kr.run("pause", "g")
    assert refused.code == 4 and "not running" in refused.err


# ---------------------------------------------------------------- kvmrun run

@pytest.mark.slow
@pytest.mark.qemu
def test_run_in_foreground_stops_gracefully_on_sigterm(kr, tiny_guest):
    runner = kr.popen("run", kr.profile("fg", tiny_guest))
    kr.ok("wait", "fg", "--for", "ready", "--timeout", "180")
    qemu = kr.status("fg")["pid"]

    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=180)
    assert runner.returncode == 0, err.decode()
    assert not pid_alive(qemu)
    info = kr.status("fg")
    assert info["state"] == "stopped"
    assert info["ended"]["by"] == "SIGTERM" and info["ended"]["stage"] == "acpi"
    assert info["ended"]["shutdown_reason"] == "guest-shutdown"
    assert not files(kr.guest_dir("fg")) & (SOCKETS | {"qemu.pid"})


@pytest.mark.slow
@pytest.mark.qemu
def test_run_in_foreground_sigterm_while_qemu_starts(kr, tiny_guest):
    """SIGTERM as soon as QEMU exists (before QMP is up, if the timing allows): the guest
    is still stopped through the ladder, never left running without its supervisor."""
    runner = kr.popen("run", kr.profile("early", tiny_guest))
    pidfile = kr.guest_dir("early") / "qemu.pid"
    deadline = time.monotonic() + 120
    while not pidfile.exists() and runner.poll() is None:
        assert time.monotonic() < deadline, "QEMU never wrote its pidfile"
        time.sleep(0.01)
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=240)
    assert runner.returncode == 0, err.decode()
    assert qemu_processes(kr) == []
    info = kr.status("early")
    assert info["state"] == "stopped" and info["ended"]["by"] == "SIGTERM"


@pytest.mark.slow
@pytest.mark.qemu
def test_run_in_foreground_escalates_when_the_guest_ignores_acpi(kr, noacpi_guest):
    profile = kr.profile("fg", noacpi_guest, shutdown={"timeout": 3})
    runner = kr.popen("run", profile)
    kr.ok("wait", "fg", "--for", "ready", "--timeout", "180")
    qemu = kr.status("fg")["pid"]

    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=180)
    assert runner.returncode == 10, err.decode()
    assert "sending QMP quit" in err.decode()
    assert not pid_alive(qemu)
    info = kr.status("fg")
    assert info["state"] == "stopped" and info["ended"]["stage"] == "quit"
    assert info["ended"]["detail"] == "stopped by SIGTERM, escalated to quit"


# ---------------------------------------------------------------- records across upgrades

@pytest.mark.slow
@pytest.mark.qemu
def test_a_guest_started_by_the_previous_kvmrun_still_stops_and_reports(kr, tiny_guest):
    """Guests outlive upgrades: a guest whose launch.json and state.json are in kvmrun 0.1's
    format (no "version") is shown, and stops gracefully, by this kvmrun. The start runs
    with --debug, which prints the exact QEMU command line."""
    started = kr.ok("--debug", "start", kr.profile("old", tiny_guest))
    qemu_line = [line for line in started.err.splitlines() if "debug: qemu: " in line]
    assert qemu_line and "qemu-system-x86_64" in qemu_line[0] and "-name" in qemu_line[0]
    for record in ("launch.json", "state.json"):
        path = kr.guest_dir("old") / record
        data = json.loads(path.read_text())
        assert data.pop("version") == {"launch.json": 5, "state.json": 1}[record]
        # the fields kvmrun added after 0.1
        for newer in ("run_id", "serial_log_max", "machine_type", "helpers", "cgroup"):
            data.pop(newer, None)
        path.write_text(json.dumps(data, indent=1))       # as kvmrun 0.1 wrote it
    info = kr.status("old")
    assert info["state"] == "running" and info["vcpus"] == 1
    assert "stopped old: the guest powered off" in kr.ok("stop", "old").out
    ended = kr.status("old")["ended"]
    assert ended["reason"] == "stopped" and ended["stage"] == "acpi"


# ---------------------------------------------------------------- the quick start

def supervisor_how(kr, name: str) -> str:
    """How the guest's supervisor came to be: "handed over" (forked by `kvmrun start`, then
    exec'd in place once QEMU was spawned: python -I -S -c '… kvmrun.guest.supervisor …'
    --adopt QEMU_PID), "exec'd" (an interpreter of its own from the start: a migration's
    target), or "forked" (still the `kvmrun start` that forked it)."""
    state = recorded_state(kr, name)
    argv = Path(f"/proc/{state['supervisor_pid']}/cmdline").read_bytes().split(b"\0")
    if b"kvmrun.guest.supervisor" not in b" ".join(argv):
        return "forked"
    if b"--adopt" in argv:
        assert argv[argv.index(b"--adopt") + 1] == str(state["qemu_pid"]).encode()
        return "handed over"
    return "exec'd"


@pytest.mark.slow
@pytest.mark.qemu
def test_an_unchanged_profile_starts_again_from_its_cached_launch(kr, tiny_guest):
    """The second `kvmrun start` of an unchanged profile starts from the cached launch (no
    typer, no yaml, no compile); on both paths the supervisor is a fork of `kvmrun start`
    (no second interpreter before QEMU) that hands over to a lean interpreter in place once
    QEMU is spawned; the guest is the same, it stops gracefully, and a change to the
    profile (or a file it names going away) takes the full path."""
    profile = kr.profile("q", tiny_guest)
    first = kr.ok("start", profile)
    assert supervisor_how(kr, "q") == "handed over"
    argv = recorded_state(kr, "q")["argv"]
    kr.ok("stop", "q")
    assert len(list((kr.base / "cache" / "launch").glob("*.json"))) == 1

    # the console script's own entry, in a probe that then lists what it imported
    loaded, out = imported_by(["start", profile], kr.env, timeout=600)
    assert out.splitlines()[0].startswith("started q (pid ") and "ready" in out
    assert out.splitlines()[1:] == first.out.splitlines()[1:]
    assert ours(loaded) == QUICK_START and not heavy(loaded)     # no typer, no yaml
    state = recorded_state(kr, "q")
    assert supervisor_how(kr, "q") == "handed over"
    assert parent_of(state["qemu_pid"]) == state["supervisor_pid"]   # still QEMU's parent
    assert proc.identified(state["supervisor_pid"], state["supervisor_starttime"])
    fds = Path(f"/proc/{state['supervisor_pid']}/fd")
    pipes = [os.readlink(fd) for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:")]
    assert len(pipes) == 2 and len(set(pipes)) == 1    # its wake-up pipe's two ends: the
                                                       # ready pipe was closed at ready
    assert state["argv"] == argv
    assert kr.status("q")["state"] == "running"
    assert "stopped q: the guest powered off" in kr.ok("stop", "q").out
    assert kr.status("q")["ended"]["stage"] == "acpi"

    profile.write_text(profile.read_text().replace("256M", "320M"))       # changed: full path
    kr.ok("start", profile)
    assert supervisor_how(kr, "q") == "handed over"
    assert kr.status("q")["memory_mib"] == 320
    kr.ok("kill", "q")
    gone = kr.base / "gone.img"
    gone.write_bytes(b"\0" * 65536)
    withdisk = kr.profile("d", tiny_guest, disks=[{"path": str(gone), "format": "raw"}])
    kr.ok("start", withdisk)
    kr.ok("kill", "d")
    gone.unlink()                                # a file it names is gone: the full error
    result = kr.run("start", withdisk)
    assert result.code == 2 and "not found" in result.err


@pytest.mark.qemu
def test_supervisor_log_holds_this_start_and_the_one_before(kr, tiny_guest):
    """Each start moves the last supervisor.log to supervisor.log.1 (the full path and the
    quick start alike): four starts of a halted guest leave two starts' worth, not four."""
    profile = kr.profile("sl", tiny_guest, halted=True)
    pids = []
    for _ in range(4):                         # the full path, then three quick starts
        kr.ok("start", profile)
        pids.append(kr.status("sl")["pid"])
        kr.ok("kill", "sl")
    logs = {name: (kr.guest_dir("sl") / name).read_text()
            for name in ("supervisor.log", "supervisor.log.1")}
    said = {name: re.findall(r"QEMU running \(pid (\d+)\)", text) for name, text in logs.items()}
    assert said == {"supervisor.log": [str(pids[3])], "supervisor.log.1": [str(pids[2])]}, logs


@pytest.mark.slow
@pytest.mark.qemu
def test_a_quick_start_whose_qemu_fails_leaves_nothing_behind(kr, tiny_guest):
    """QEMU exits at once after a quick start spawned it (its kernel file was overwritten
    in place, which the cached launch does not see): the lean supervisor that took over
    reports QEMU's own error; no QEMU, no supervisor, no socket is left, and the next start
    fails the same way."""
    kernel = kr.base / "vmlinuz"
    kernel.write_bytes(Path(tiny_guest.kernel).read_bytes())
    profile = kr.profile("qf", tiny_guest, kernel={
        "path": str(kernel), "initrd": str(tiny_guest.initrd),
        "append": f"console={tiny_guest.console} quiet"})
    kr.ok("start", profile)                   # the full path caches the launch
    kr.ok("kill", "qf")
    kernel.write_bytes(b"not a kernel\n" * 512)
    loaded, _ = imported_by(["start", profile], kr.env, timeout=120)
    assert not heavy(loaded)                  # the quick path took it (no typer, no yaml)
    for _ in range(2):
        result = kr.run("start", profile)
        assert result.code == 7, result.err
        assert "QEMU failed to start: QEMU exited with status 1 while starting" in result.err
        assert "qemu said: qemu: linux kernel too old to load a ram disk" in result.err
        left = sorted(p.name for p in kr.guest_dir("qf").iterdir())
        assert left == ["lock", "network.json", "supervisor.log", "supervisor.log.1"], left
        assert kr.our_processes() == {}           # no QEMU, supervisor or kvmrun command
