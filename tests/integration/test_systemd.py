"""systemd integration: the unit files verify, and a test plays systemd for real.

The unit's ExecStart line is parsed from systemd/kvmrun@.service and run exactly as written
(with %i replaced by the instance), under a NOTIFY_SOCKET the test binds, so the file and
the tests cannot drift apart."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import KVMRUN, REPO

UNIT = REPO / "systemd" / "kvmrun@.service"
USER_UNIT = REPO / "systemd" / "user" / "kvmrun@.service"


def unit_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines()
            if line.startswith(f"{key}=")]


def exec_start(name: str) -> list[str]:
    (line,) = unit_lines(UNIT, "ExecStart")
    return [arg.replace("%i", name) for arg in shlex.split(line)]


# ---------------------------------------------------------------- the unit files

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("unit, user", [(UNIT, False), (USER_UNIT, True)])
def test_units_verify(tmp_path, unit, user):
    instance = tmp_path / "kvmrun@web1.service"
    instance.write_text(unit.read_text())
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    cmd = ["systemd-analyze", *(["--user"] if user else []), "verify", str(instance)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


def test_unit_contract():
    """What the unit promises: notify, foreground supervisor, SIGTERM to the supervisor
    only, restart on failure but not after a requested stop or kill, /dev/kvm allowed."""
    text = UNIT.read_text()
    for line in ("Type=notify", "KillMode=mixed", "Restart=on-failure",
                 "RestartPreventExitStatus=2 10 11", "DeviceAllow=/dev/kvm rw",
                 "DeviceAllow=/dev/net/tun rw"):
        assert line in text.splitlines()
    assert exec_start("web1")[-2:] == ["run", "web1"]
    stop_sec = int(unit_lines(UNIT, "TimeoutStopSec")[0])
    assert stop_sec >= 60 + 5 + 5 + 30          # default ACPI timeout + quit/TERM/KILL grace


def test_install_print_renders_this_kvmrun(kr):
    rendered = kr.ok("systemd", "install", "--print").out
    (line,) = [l for l in rendered.splitlines() if l.startswith("ExecStart=")]
    argv = shlex.split(line.split("=", 1)[1])
    assert Path(argv[0]).exists() and argv[1:3] == ["-m", "kvmrun"]
    assert argv[3:] == ["run", "%i"]


def test_install_print_name_shows_the_dropin_and_writes_nothing(kr):
    units = kr.base / "units"
    env = {**kr.env, "KVMRUN_SYSTEMD_DIR": str(units)}
    shown = kr.run("systemd", "install", "--print", "web1", "--guests", env=env)
    assert shown.code == 0, shown
    headers = [l for l in shown.out.splitlines() if l.startswith(f"# {units}/")]
    assert headers == [f"# {units}/kvmrun@.service", f"# {units}/kvmrun-guests.service",
                       f"# {units}/kvmrun@web1.service.d/kvmrun-env.conf",
                       f"# {units}/kvmrun-guests.service.d/kvmrun-env.conf"]
    assert f'Environment="KVMRUN_RUN_DIR={kr.run_dir}"' in shown.out.splitlines()
    assert shown.out.count("\nPrivateTmp=no\n") == 2           # kr.base lies in /tmp
    assert not units.exists()
    plain = {k: v for k, v in env.items() if k not in
             ("KVMRUN_RUN_DIR", "KVMRUN_CONFIG_DIR", "KVMRUN_DATA_DIR", "KVMRUN_CACHE_DIR",
              "KVMRUN_ACCEL")}
    shown = kr.run("systemd", "install", "--print", "web1", env=plain)
    assert "# (none: kvmrun's default directories" in shown.out
    assert "Environment=" not in shown.out


def test_autostart_marks_only_defined_vms(kr, tiny_guest):
    assert kr.run("autostart", "nosuch").code == 2
    assert kr.run("autostart", "--disable").code == 2
    kr.ok("define", kr.profile("web1", tiny_guest))
    assert kr.ok("autostart", "web1").out == "web1: marked autostart\n"
    mark = kr.base / "config" / "autostart" / "web1.yaml"
    assert mark.is_symlink() and mark.resolve() == kr.base / "config" / "vms" / "web1.yaml"
    assert kr.ok("autostart").out == "web1\n"
    assert kr.ok("autostart", "web1", "--disable", "--json").out.replace(" ", "") == \
        '{\n"name":"web1",\n"autostart":false,\n"changed":true\n}\n'
    assert not mark.is_symlink() and kr.ok("autostart").out == ""


def test_enable_without_systemd_links_the_instance(kr, tiny_guest):
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is running here; enable would change the host")
    env = {**kr.env, "KVMRUN_SYSTEMD_DIR": str(kr.base / "units")}
    missing = kr.run("systemd", "enable", "nosuch", env=env)
    assert missing.code == 4 and "'nosuch' is not a defined VM" in missing.err
    kr.ok("define", kr.profile("svc", tiny_guest))
    result = kr.run("systemd", "enable", "svc", env=env)
    assert result.code == 0, result
    link = kr.base / "units" / "multi-user.target.wants" / "kvmrun@svc.service"
    assert "systemd is not running here" in result.out
    assert link.is_symlink() and link.resolve() == (kr.base / "units" / "kvmrun@.service")
    assert kr.run("systemd", "disable", "svc", env=env).code == 0
    assert not link.is_symlink()


# ---------------------------------------------------------------- playing systemd

class FakeSystemd:
    """A NOTIFY_SOCKET and the unit's ExecStart, run as systemd would run it."""

    def __init__(self, kr, name: str, watchdog_usec: int | None = None):
        self.kr = kr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = kr.base / "notify.sock"
        self.sock.bind(str(self.path))
        self.messages: list[tuple[float, str]] = []
        env = {**kr.env, "NOTIFY_SOCKET": str(self.path),
               "PATH": f"{KVMRUN.parent}:{os.environ['PATH']}"}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = subprocess.Popen(exec_start(name), env=env, cwd=kr.base,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        kr.popens.append(self.proc)

    def wait_for(self, message: str, timeout: float = 240) -> float:
        """Collect datagrams until one contains `message`; returns when it arrived."""
        deadline = time.monotonic() + timeout
        for at, text in self.messages:
            if message in text.splitlines():
                return at
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.messages.append((time.monotonic(), data))
            if message in data.splitlines():
                return self.messages[-1][0]
            if self.proc.poll() is not None and message not in data:
                continue
        raise AssertionError(f"no {message!r} from the supervisor; got "
                             f"{[m for _, m in self.messages]}; stderr: "
                             f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def drain(self) -> None:
        """Collect what is still queued on the socket."""
        self.sock.setblocking(False)
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except BlockingIOError:
                return

    def count(self, message: str) -> int:
        return sum(message in text.splitlines() for _, text in self.messages)

    def exit_code(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd(kr):
    made = []

    def make(name: str, **kw) -> FakeSystemd:
        made.append(FakeSystemd(kr, name, **kw))
        return made[-1]
    yield make
    for fs in made:
        fs.close()


def qemu_pid(kr, name: str) -> int:
    return json.loads((kr.guest_dir(name) / "state.json").read_text())["qemu_pid"]


@pytest.mark.slow
def test_ready_watchdog_and_graceful_sigterm(kr, tiny_guest, fake_systemd):
    kr.ok("define", kr.profile("svc", tiny_guest))
    sd = fake_systemd("svc", watchdog_usec=2_000_000)
    sd.wait_for("READY=1")
    # READY=1 only once QMP answers and the console printed the profile's ready pattern
    assert tiny_guest.ready_marker in (kr.guest_dir("svc") / "serial.log").read_text()
    assert kr.status("svc")["state"] == "running"
    assert kr.ok("qmp", "svc", "query-status").out.count('"running": true') == 1
    sd.wait_for("WATCHDOG=1", timeout=30)
    sd.messages.clear()
    sd.wait_for("WATCHDOG=1", timeout=30)           # pings keep coming
    sd.proc.send_signal(signal.SIGTERM)
    sd.wait_for("STOPPING=1", timeout=30)
    assert sd.exit_code() == 0
    events = [json.loads(l) for l in (kr.guest_dir("svc") / "events.jsonl").read_text()
              .splitlines()]
    shutdowns = [e["data"]["reason"] for e in events if e["event"] == "SHUTDOWN"]
    assert shutdowns == ["guest-shutdown"]
    ended = kr.status("svc")["ended"]
    assert ended["reason"] == "stopped" and ended["stage"] == "acpi"


@pytest.mark.slow
def test_crashed_qemu_exits_non_zero(kr, tiny_guest, fake_systemd):
    kr.ok("define", kr.profile("svc", tiny_guest))
    sd = fake_systemd("svc")
    sd.wait_for("READY=1")
    kr.kill9(qemu_pid(kr, "svc"))
    assert sd.exit_code() == 8                       # crashed: systemd restarts it
    info = kr.status("svc")
    assert info["state"] == "crashed" and info["ended"]["signal"] == 9


@pytest.mark.slow
def test_guest_ignoring_acpi_is_escalated(kr, noacpi_guest, fake_systemd):
    kr.ok("define", kr.profile("svc", noacpi_guest, shutdown={"timeout": 3}))
    sd = fake_systemd("svc")
    sd.wait_for("READY=1")
    sd.proc.send_signal(signal.SIGTERM)
    sd.wait_for("STOPPING=1", timeout=30)
    assert sd.exit_code() == 10                      # the exit code says it escalated
    sd.drain()
    ended = kr.status("svc")["ended"]
    assert ended["reason"] == "stopped" and ended["stage"] == "quit"
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for _, t in sd.messages
               for m in t.splitlines())
