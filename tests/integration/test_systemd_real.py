"""kvmrun against a real systemd (tests/integration/systemd_pid1.py: systemd as PID 1 of
its own namespaces, its units in a private /etc/systemd/system): `kvmrun start`/`stop`
through an enabled kvmrun@NAME, the environment drop-in that lets the unit find a VM in
moved directories, a unit that fails to start, and kvmrun-guests.service at "boot" and
"shutdown" (systemctl start/stop of the unit) with real tiny guests.

Without systemd (the host here): the routing decision when systemd does not answer, and
`kvmrun guests start|stop` run directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.integration.conftest import KVMRUN, Result
from tests.integration.systemd_pid1 import RealSystemd, Unavailable


class InSystemd:
    """kvmrun and systemctl inside the real systemd's namespaces, with the test's env."""

    def __init__(self, kr, sd: RealSystemd):
        self.kr, self.sd = kr, sd

    def run(self, *args, timeout: float = 300) -> Result:
        done = self.sd.run(KVMRUN, *args, env=self.kr.env, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args) -> Result:
        result = self.run(*args)
        assert result.code == 0, f"kvmrun {' '.join(map(str, args))}:\n{result}\n" \
                                 f"--- systemd\n{self.sd.log()}"
        return result

    def status(self, name: str) -> dict:
        return json.loads(self.ok("status", name, "--json").out)

    def state(self, name: str) -> dict:
        return json.loads((self.kr.guest_dir(name) / "state.json").read_text())

    def systemctl(self, *args) -> subprocess.CompletedProcess:
        return self.sd.run("systemctl", *args, timeout=600)

    def prop(self, unit: str, name: str) -> str:
        return self.systemctl("show", "-p", name, "--value", unit).stdout.strip()


@pytest.fixture
def insd(kr):
    scratch = kr.base / "sd"
    scratch.mkdir()
    try:
        sd = RealSystemd(scratch)
    except Unavailable as why:
        pytest.skip(f"no real systemd here: {why}")
    try:
        yield InSystemd(kr, sd)
    finally:
        sd.close()


def events(kr, name: str) -> list[dict]:
    return [json.loads(line) for line in
            (kr.guest_dir(name) / "events.jsonl").read_text().splitlines() if line.strip()]


def event_time(kr, name: str, event: str) -> float:
    """When the guest's first `event` happened (QEMU's own timestamp)."""
    ts = [e["timestamp"] for e in events(kr, name) if e["event"] == event][0]
    return ts["seconds"] + ts["microseconds"] / 1e6


# ---------------------------------------------------------------- kvmrun@NAME

@pytest.mark.slow
def test_start_and_stop_go_through_the_enabled_unit(kr, tiny_guest, insd):
    kr.ok("define", kr.profile("svc", tiny_guest))
    installed = insd.ok("systemd", "install", "svc").out
    dropin = "/etc/systemd/system/kvmrun@svc.service.d/kvmrun-env.conf"
    assert f"(environment in {dropin})" in installed
    assert insd.systemctl("is-enabled", "kvmrun@svc.service").stdout.strip() == "enabled"
    # systemd itself parsed the drop-in: the unit runs with the test's directories
    env = insd.prop("kvmrun@svc.service", "Environment").split()
    assert f"KVMRUN_RUN_DIR={kr.run_dir}" in env
    assert f"KVMRUN_CONFIG_DIR={kr.base / 'config'}" in env and "KVMRUN_ACCEL=tcg" in env
    assert insd.prop("kvmrun@svc.service", "PrivateTmp") == "no"    # kr.base is in /tmp
    assert insd.prop("kvmrun@svc.service", "DropInPaths") == dropin

    refused = insd.run("start", "svc", "--memory", "512M")
    assert refused.code == 2 and "cannot pass --memory" in refused.err
    assert "--no-unit" in refused.err and not kr.guest_dir("svc").exists()

    started = insd.ok("start", "svc")
    assert started.out.startswith("started svc through kvmrun@svc.service")
    assert insd.systemctl("is-active", "kvmrun@svc.service").stdout.strip() == "active"
    info = insd.status("svc")
    assert info["state"] == "running"
    state = insd.state("svc")
    assert state["unit"] == "kvmrun@svc.service" and state["ready"]
    # the unit's main process is the guest's supervisor (the unit ran `kvmrun run svc`)
    assert int(insd.prop("kvmrun@svc.service", "MainPID")) == info["supervisor_pid"]
    assert '"running": true' in insd.ok("qmp", "svc", "query-status").out

    assert insd.run("stop", "svc", "--timeout", "5").code == 2     # the unit's timeout rules
    stopped = json.loads(insd.ok("stop", "svc", "--json").out)
    assert stopped["via"] == "systemctl" and stopped["unit"] == "kvmrun@svc.service"
    assert stopped["stage"] == "acpi" and stopped["reason"] == "stopped"
    assert insd.systemctl("is-active", "kvmrun@svc.service").stdout.strip() == "inactive"
    ended = insd.status("svc")["ended"]
    assert ended["reason"] == "stopped" and ended["stage"] == "acpi"


def test_a_unit_that_fails_to_start_says_why(kr, tiny_guest, insd):
    """A defined VM whose kernel went away: `kvmrun start` shows systemctl's own message and
    where to look, exits 7, and the unit is not restarted in a loop (exit 2 of `kvmrun run`,
    a profile error, is final: RestartPreventExitStatus)."""
    kernel = kr.base / "vmlinuz"
    shutil.copy(tiny_guest.kernel, kernel)
    profile = kr.profile("bad", tiny_guest)
    profile.write_text(profile.read_text().replace(str(tiny_guest.kernel), str(kernel)))
    kr.ok("define", profile)
    insd.ok("systemd", "enable", "bad")
    kernel.unlink()
    failed = insd.run("start", "bad")
    assert failed.code == 7, failed
    assert "systemctl start kvmrun@bad.service failed (exit 1)" in failed.err
    assert "journalctl -u kvmrun@bad.service" in failed.err and "--no-unit" in failed.err
    assert insd.prop("kvmrun@bad.service", "ExecMainStatus") == "2"     # a profile error
    assert insd.prop("kvmrun@bad.service", "NRestarts") == "0"
    assert insd.systemctl("is-active", "kvmrun@bad.service").stdout.strip() == "failed"


# ---------------------------------------------------------------- kvmrun-guests.service

@pytest.mark.slow
def test_guests_service_autostarts_and_stops_guests_in_parallel(kr, tiny_guest, insd):
    kr.ok("define", kr.profile("auto", tiny_guest))
    kr.ok("define", kr.profile("loose", tiny_guest))
    assert insd.ok("autostart", "auto").out.strip() == "auto: marked autostart"
    assert json.loads(insd.ok("autostart", "--json").out) == ["auto"]
    insd.ok("systemd", "install", "--guests")
    assert insd.systemctl("is-enabled", "kvmrun-guests.service").stdout.strip() == "enabled"

    # "boot": the unit's ExecStart (kvmrun guests start) starts the marked VM only
    done = insd.systemctl("start", "kvmrun-guests.service")
    assert done.returncode == 0, done.stderr + insd.sd.log()
    assert insd.status("auto")["state"] == "running"
    assert insd.state("auto")["unit"] == "kvmrun-guests.service"
    assert not kr.guest_dir("loose").exists()
    insd.ok("start", "loose")                     # not enabled: started here, outside units
    assert insd.state("loose")["unit"] is None

    # "shutdown": ExecStop (kvmrun guests stop) powers both off gracefully, at once
    done = insd.systemctl("stop", "kvmrun-guests.service")
    assert done.returncode == 0, done.stderr + insd.sd.log()
    for name in ("auto", "loose"):
        ended = insd.status(name)["ended"]
        assert ended["reason"] == "stopped" and ended["stage"] == "acpi", (name, ended)
        assert [e["data"]["reason"] for e in events(kr, name)
                if e["event"] == "SHUTDOWN"] == ["guest-shutdown"]
    # in parallel: each guest got its power button before the other one had powered off
    assert event_time(kr, "auto", "POWERDOWN") < event_time(kr, "loose", "SHUTDOWN")
    assert event_time(kr, "loose", "POWERDOWN") < event_time(kr, "auto", "SHUTDOWN")

    # the verbs alone, with --json; a marked VM enabled as its own unit is left to systemd
    insd.ok("systemd", "enable", "loose")
    insd.ok("autostart", "loose")
    rows = json.loads(insd.ok("guests", "start", "--json").out)
    assert [(r["name"], r["result"]) for r in rows] == [("auto", "started"),
                                                        ("loose", "unit")]
    assert rows[0]["pid"] == insd.status("auto")["pid"]
    rows = json.loads(insd.ok("guests", "stop", "--json").out)
    assert rows == [{"name": "auto", "result": "stopped", "stage": "acpi", "method": "acpi"}]
    assert json.loads(insd.ok("guests", "stop", "--json").out) == []
    assert insd.ok("autostart", "auto", "--disable").out.strip() == "auto: autostart disabled"
    insd.ok("undefine", "loose")                  # undefine drops the mark too
    assert json.loads(insd.ok("autostart", "--json").out) == []


# ---------------------------------------------------------------- systemd that does not answer

@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare missing")
def test_booted_with_systemd_but_it_does_not_answer(kr, tiny_guest):
    """/run/systemd/system exists (sd_booted() says yes) in a private mount namespace, but
    no systemd listens: once the unit template is installed, `start` and `stop` of a
    defined VM say what systemctl said and offer --no-unit, which then acts directly (a
    halted guest: no boot needed)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace)")
    kr.ok("define", kr.profile("svc", tiny_guest))
    script = kr.base / "faked.sh"
    script.write_text(
        "set -e\nmount --make-rprivate /\nmount -t tmpfs tmpfs /run\n"
        "mkdir -p /run/systemd/system\nmount -t tmpfs tmpfs /etc/systemd/system\n"
        'for args in "systemd install" "start svc" "stop svc" "start svc --no-unit --halted" '
        '"stop svc --no-unit --timeout 1" "kill svc"; do\n'
        f'  echo "== $args"; {KVMRUN} $args 2>&1 || echo "exit $?"\ndone\n')
    done = subprocess.run(["unshare", "--mount", "bash", str(script)], env=kr.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    parts = dict(p.split("\n", 1) for p in done.stdout.split("== ")[1:])
    # the template is written, the reload cannot reach systemd
    assert parts["systemd install"].startswith("kvmrun: error: systemctl daemon-reload "
                                               "failed (exit 1): ")
    for verb in ("systemd install", "start svc", "stop svc"):
        said = parts[verb]
        if verb != "systemd install":
            assert said.startswith("kvmrun: error: systemctl is-enabled kvmrun@svc.service "
                                   "failed (exit 1): "), said
        assert "Failed to connect to bus" in said and "--no-unit" in said
        assert said.rstrip().endswith("exit 3")
    assert "\nstarted svc (pid " in parts["start svc --no-unit --halted"]
    assert parts["stop svc --no-unit --timeout 1"].rstrip().endswith("exit 5")  # halted
    assert parts["kill svc"].startswith("killed svc")
