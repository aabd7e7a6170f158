"""Faults from the red-team pass (issue 12), each against real QEMU and the tiny guest:
a corrupt state record, a crash and a killed command during `stop`, a QEMU stopped by
SIGSTOP, a dead supervisor, a full run directory, a flooding console, a crashed guest on
an isolated network. Each test says the bug it keeps fixed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kvmrun.guest.shutdown import type_on_console
from tests.integration.conftest import kill_identified, pid_alive

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def request_of(kr, name: str) -> dict:
    path = kr.guest_dir(name) / "request.json"
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def signal_ours(kr, pid: int, sig: int) -> None:
    """Send `sig` to one of this test's own processes, through a pidfd."""
    mine = kr.our_processes()
    assert pid in mine, f"pid {pid} is not a process of this test"
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- bug 2, 10

def test_truncated_state_of_a_running_guest(kr, tiny_guest):
    """A truncated state.json: status still sees the QEMU (its pidfile lock), a second
    start is refused, and the guest can be killed."""
    kr.start(kr.profile("g", tiny_guest))
    pid = kr.status("g")["pid"]
    (kr.guest_dir("g") / "state.json").write_text('{"name": "g", "sta')

    info = kr.status("g")
    assert info["state"] == "running" and info["pid"] == pid
    assert info["record"] == "unreadable" and "QEMU still holds" in info["problem"]
    code, out, err = kr.run("start", kr.base / "g.yaml")
    assert code == 4 and "already running" in err, err
    assert [p for p in kr.our_processes() if "qemu-system" in
            Path(f"/proc/{p}/cmdline").read_text()] == [pid]        # no second QEMU
    rows = json.loads(kr.ok("list", "--json").out)
    assert [(r["name"], r["state"], r["pid"]) for r in rows] == [("g", "running", pid)]

    kr.ok("kill", "g")
    assert not pid_alive(pid)
    assert kr.wait_state("g", lambda i: i["state"] != "running")["pid"] is None


# ---------------------------------------------------------------- bug 4, 8

def stop_in_background(kr, name: str):
    stopper = kr.popen("stop", name, "--timeout", "200")
    wait_for(lambda: request_of(kr, name).get("action") == "stop", 60, "the stop request")
    return stopper


def test_qemu_killed_during_stop_is_a_crash(kr, noacpi_guest):
    """QEMU SIGKILLed while `stop` waits for an ACPI power-off that never comes: the end
    is a crash (exit 8 for systemd's Restart=on-failure), and `stop` says so."""
    kr.start(kr.profile("g", noacpi_guest))
    pid = kr.status("g")["pid"]
    stopper = stop_in_background(kr, "g")
    kr.kill9(pid)
    out, err = stopper.communicate(timeout=120)
    assert stopper.returncode == 4, err
    assert b"crashed while it was being stopped" in err
    info = kr.wait_state("g", lambda i: i["state"] in ("crashed", "stopped"))
    assert info["state"] == "crashed"
    assert info["ended"]["reason"] == "crashed" and info["ended"]["signal"] == 9
    assert "during kvmrun stop's stop" in info["ended"]["detail"]
    assert json.loads((kr.guest_dir("g") / "state.json").read_text())["supervisor_exit"] == 8


def test_a_killed_stop_is_not_credited(kr, noacpi_guest):
    """`stop` killed mid-way: the guest is not left 'shutting-down', and its later
    power-off from inside is the guest's own, not kvmrun stop's."""
    kr.start(kr.profile("g", noacpi_guest))
    stopper = stop_in_background(kr, "g")
    assert kr.status("g")["state"] == "shutting-down"
    stopper.kill()
    stopper.wait(timeout=30)
    assert kr.status("g")["state"] == "running"
    type_on_console(str(kr.guest_dir("g") / "console.sock"), "poweroff -f")
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["state"] == "stopped", info
    assert info["ended"]["reason"] == "guest-shutdown", info["ended"]


# ---------------------------------------------------------------- bug 5, 13

def test_sigstopped_qemu_and_dead_supervisor(kr, tiny_guest):
    """A QEMU stopped by SIGSTOP is 'not-responding' (no QMP wait, no BlockingIOError);
    a dead supervisor is said in status; both still end cleanly with `kill`."""
    kr.start(kr.profile("g", tiny_guest))
    info = kr.status("g")
    pid, sup = info["pid"], info["supervisor_pid"]
    signal_ours(kr, pid, signal.SIGSTOP)
    try:
        for _ in range(3):                  # repeated calls fill no backlog, never crash
            info = kr.status("g")
            assert info["state"] == "not-responding" and "SIGSTOP" in info["problem"]
        text = kr.ok("status", "g").out
        assert "not-responding" in text
        code, out, err = kr.run("qmp", "g", "query-status")
        assert code != 0 and "internal error" not in err and "Traceback" not in err
    finally:
        signal_ours(kr, pid, signal.SIGCONT)
    assert kr.wait_state("g", lambda i: i["state"] == "running")["qemu_status"] == "running"

    kr.kill9(sup)
    wait_for(lambda: not pid_alive(sup), 30, "the supervisor to die")
    info = kr.status("g")
    assert info["state"] == "running" and info["supervisor"] == "dead"
    assert "its supervisor is dead" in kr.ok("status", "g").out
    kr.ok("kill", "g")
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["ended"]["reason"] == "killed" and "supervisor was not running" in \
        info["ended"]["note"]


# ---------------------------------------------------------------- bug 7

def fill(directory: Path) -> Path:
    """Fill the file system of `directory` (ENOSPC from now on)."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(OSError):
        (directory / "probe").write_bytes(b"x" * 8192)
    return filler


@pytest.fixture
def small_run_dir(kr):
    """The test's run directory on a tmpfs of 8 MiB of its own (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    kr.run_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                    str(kr.run_dir)], check=True)
    try:
        yield kr.run_dir
    finally:
        kr.cleanup()
        subprocess.run(["umount", "-l", str(kr.run_dir)], check=False)


def test_stop_and_kill_on_a_full_run_directory(kr, tiny_guest, small_run_dir):
    """A full run directory: stop and kill still act and are credited, the end is not
    read as a crash, no temporary file stays, and a start fails with a plain message."""
    profile = kr.profile("g", tiny_guest)
    kr.start(profile)
    filler = fill(small_run_dir)
    stopped = kr.run("stop", "g")
    assert stopped.code == 0, stopped
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["state"] == "stopped" and info["ended"]["by"] == "kvmrun stop", info

    code, out, err = kr.run("start", kr.profile("h", tiny_guest))
    assert code != 0 and "internal error" not in err and "Traceback" not in err, err
    assert "No space left on device" in err
    assert not kr.our_processes() and not (small_run_dir / "h").exists()   # nothing half-made

    filler.unlink()
    kr.start(profile)
    filler = fill(small_run_dir)
    killed = kr.run("kill", "g")
    assert killed.code == 0, killed
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["ended"]["reason"] == "killed", info
    assert not list(small_run_dir.rglob(".*.tmp"))


# ---------------------------------------------------------------- bug 12

def test_serial_log_is_rotated(kr, tiny_guest):
    """A flooding guest: serial.log is rotated at serial_log_max (1 MiB here) and
    `logs -n` reads from the end."""
    kr.start(kr.profile("g", tiny_guest, serial_log_max="1M"))
    log, old = kr.guest_dir("g") / "serial.log", kr.guest_dir("g") / "serial.log.1"
    type_on_console(str(kr.guest_dir("g") / "console.sock"),
                    "while :; do echo 0123456789abcdef0123456789abcdef0123456789abcdef; done")
    wait_for(old.exists, 180, "serial.log.1")
    assert old.stat().st_size > 1 << 20
    wait_for(lambda: log.stat().st_size > 0, 60, "new output")
    # the supervisor looks every 2 s: the live part stays near the limit, never far over
    assert log.stat().st_size < 6 << 20
    last = kr.ok("logs", "g", "-n", "1").out
    assert last.count("\n") <= 1 and len(last) < 200
    kr.ok("kill", "g")


# ---------------------------------------------------------------- bug 11

def test_isolated_hub_after_a_crash(kr, tiny_guest):
    """A guest on an isolated network crashes with its supervisor: its port is collected,
    `net stop` works, and the hub goes."""
    lab = f"lab-{uuid.uuid4().hex[:6]}"
    kr.env = {**kr.env, "KVMRUN_HUB_IDLE": "1", "KVMRUN_PORT_GRACE": "3"}
    kr.start(kr.profile("g", tiny_guest, network=[{"type": "isolated", "name": lab}]))
    info = kr.status("g")
    ports = kr.run_dir / ".net" / lab / "ports"
    assert [p.name for p in ports.iterdir()] == ["g.0"]
    kr.kill9(info["supervisor_pid"])
    kr.kill9(info["pid"])
    wait_for(lambda: not pid_alive(info["pid"]), 30, "QEMU to die")
    time.sleep(3)                                      # the port is past its start grace
    kr.ok("net", "stop", lab)                          # collects the stale port
    assert not (ports / "g.0").exists()
    assert json.loads(kr.ok("net", "status", lab, "--json").out)["members"] == []


# ---------------------------------------------------------------- bug 13: one disk, two starts

def test_two_starts_with_one_disk(kr, tiny_guest):
    """Two guests started at the same moment with one disk image: exactly one runs, the
    other is refused by kvmrun (the per-disk lock, then the in-use check), never by a
    half-started QEMU."""
    disk = kr.base / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    profiles = [kr.profile(n, tiny_guest, disks=[{"path": str(disk)}]) for n in ("a", "b")]
    starts = [kr.popen("start", p, "--no-wait-ready") for p in profiles]
    results = [(s.wait(timeout=200), s.stderr.read().decode()) for s in starts]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 4], results
    refused = next(err for code, err in results if code == 4)
    assert "is being started by another guest" in refused or "is in use by" in refused
    assert "qemu said" not in refused                     # kvmrun refused, not QEMU
    winner = "a" if results[0][0] == 0 else "b"
    loser = "b" if winner == "a" else "a"
    assert kr.status(winner)["pid"] and not (kr.guest_dir(loser) / "qemu.pid").exists()
    kr.ok("kill", winner)


def test_a_guest_that_powers_off_while_its_supervisor_is_dead_is_not_crashed(kr, tiny_guest):
    """Bug 13's last clause: nobody records how QEMU ended when its supervisor died, and
    status called every such end "crashed". QEMU removes its own pidfile when it exits
    normally (and cannot when it crashes or is killed), so a clean power-off from inside
    reads as stopped; a SIGKILL'd QEMU still reads as crashed."""
    kr.start(kr.profile("g", tiny_guest))
    info = kr.status("g")
    kr.kill9(info["supervisor_pid"])
    wait_for(lambda: not pid_alive(info["supervisor_pid"]), 30, "the supervisor to die")
    kr.ok("qmp", "g", "system_powerdown")           # the guest's acpid powers it off
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["state"] == "stopped", info
    assert info["ended"]["reason"] == "guest-shutdown", info["ended"]
    assert "supervisor was not running" in info["ended"]["note"]
    assert "crashed" not in kr.ok("status", "g").out

    kr.start(kr.profile("g", tiny_guest))
    info = kr.status("g")
    kr.kill9(info["supervisor_pid"])
    wait_for(lambda: not pid_alive(info["supervisor_pid"]), 30, "the supervisor to die")
    signal_ours(kr, info["pid"], signal.SIGKILL)
    info = kr.wait_state("g", lambda i: i["state"] != "running")
    assert info["state"] == "crashed", info
