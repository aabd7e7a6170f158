"""Other architectures and the embedded conveniences, with real guests under TCG.

aarch64 and arm boot the tiny test guest on the virt board; riscv64 runs OpenSBI and U-Boot
from the distribution's packages up to U-Boot's prompt; the gdb stub is spoken to in the GDB
remote protocol directly; `--halted` keeps the vCPUs stopped until `kvmrun resume`;
`shutdown.method: console` types `poweroff -f`; `run --console` puts the serial console on a
terminal (a pty) and gives the terminal back as it was.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import termios
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")
UBOOT = Path("/usr/lib/u-boot/qemu-riscv64_smode/uboot.elf")


def guest(arch: str, variant: str = "default"):
    binary = {"aarch64": "qemu-system-aarch64", "arm": "qemu-system-arm",
              "x86_64": "qemu-system-x86_64"}[arch]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")
    from tests.guest.build import GuestBuildError, build_guest
    try:
        return build_guest(arch, variant)
    except GuestBuildError as err:
        pytest.skip(f"cannot build the {arch} guest: {err}")


def events(kr, name: str) -> list[dict]:
    text = (kr.guest_dir(name) / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def shutdown_reasons(kr, name: str) -> list[str]:
    return [e["data"]["reason"] for e in events(kr, name) if e.get("event") == "SHUTDOWN"]


def qmp_status(kr, name: str) -> dict:
    return json.loads(kr.ok("qmp", name, "query-status").out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- boards

def test_aarch64_virt_boots_and_stops_on_the_power_key(kr):
    """No ACPI without UEFI: system_powerdown presses the virt board's GPIO power key, and
    the guest's acpid (gpio-keys -> KEY_POWER) powers it off."""
    g = guest("aarch64")
    profile = kr.profile("a64", g, arch="aarch64", smp=2)
    started = kr.start(profile)
    assert ", ready" in started.out
    info = kr.status("a64")
    assert (info["state"], info["arch"], info["machine"], info["vcpus"]) == (
        "running", "aarch64", "virt", 2)
    assert info["shutdown_method"] == "acpi"
    assert "-accel tcg,thread=multi" in " ".join(
        json.loads((kr.guest_dir("a64") / "launch.json").read_text())["argv"])
    stopped = kr.ok("stop", "a64", "--timeout", "90")
    assert "stopped a64: the guest powered off (shutdown method acpi)" in stopped.out
    assert shutdown_reasons(kr, "a64") == ["guest-shutdown"]
    assert kr.status("a64")["state"] == "stopped"


def test_arm_virt_boots_to_its_marker(kr):
    g = guest("arm")
    kr.start(kr.profile("a32", g, arch="arm"))
    assert "KVMRUN-GUEST-READY" in (kr.guest_dir("a32") / "serial.log").read_text(
        errors="replace")
    assert kr.status("a32")["machine"] == "virt"
    assert "killed a32" in kr.ok("kill", "a32").out


def test_riscv64_opensbi_and_uboot_reach_the_prompt(kr):
    for needed in (OPENSBI, UBOOT):
        if not needed.exists() or shutil.which("qemu-system-riscv64") is None:
            pytest.skip(f"{needed} (opensbi, u-boot-qemu) or qemu-system-riscv64 missing")
    profile = kr.base / "rv.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "rv", "arch": "riscv64", "accel": "tcg", "memory": "256M",
        "firmware": str(OPENSBI), "kernel": {"path": str(UBOOT)}, "network": [],
        "ready": {"console": "(?m)^=> ", "timeout": 120},
        "shutdown": {"method": "console", "command": "poweroff"}}))
    assert kr.ok("validate", profile).err == ""          # no power-button warning
    kr.start(profile)
    log = (kr.guest_dir("rv") / "serial.log").read_text(errors="replace")
    assert "OpenSBI" in log and "U-Boot" in log
    assert kr.status("rv")["shutdown_method"] == "console"
    assert "killed rv" in kr.ok("kill", "rv").out
    assert kr.status("rv")["ended"]["reason"] == "killed"


def test_a_machine_without_power_button_is_flagged(kr):
    """riscv64 virt has no power button: the default method is a warning, an explicit
    `method: acpi` an error."""
    profile = kr.base / "nobutton.yaml"
    profile.write_text("arch: riscv64\nkernel: {path: /bin/true}\n")
    result = kr.ok("validate", profile)
    assert "warning:" in result.err and "has no power button" in result.err
    profile.write_text("arch: riscv64\nkernel: {path: /bin/true}\nshutdown: {method: acpi}\n")
    result = kr.run("validate", profile)
    assert result.code == 2 and "virt machine has no power button" in result.err


# ---------------------------------------------------------------- gdb and --halted

class GdbRemote:
    """Just enough of the GDB remote serial protocol: packets with checksums and acks."""

    def __init__(self, port: int):
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.buf = b""

    def send(self, data: str) -> None:
        packet = f"${data}#{sum(data.encode()) % 256:02x}".encode()
        self.sock.sendall(packet)

    def reply(self) -> str:
        while True:
            m = re.search(rb"\$([^#]*)#[0-9a-fA-F]{2}", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                self.sock.sendall(b"+")
                return m.group(1).decode()
            chunk = self.sock.recv(4096)
            assert chunk, "the gdb stub closed the connection"
            self.buf += chunk

    def ask(self, data: str) -> str:
        self.send(data)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_gdb_stub_reads_the_pc_and_continues(kr):
    g = guest("aarch64")
    port = free_port()
    profile = kr.profile("dbg", g, arch="aarch64")
    started = kr.ok("start", profile, "--gdb", port, "--halted")
    assert f"target remote 127.0.0.1:{port}" in started.out
    assert qmp_status(kr, "dbg")["running"] is False
    gdb = GdbRemote(port)
    try:
        assert gdb.ask("?").startswith("T05")          # stopped (SIGTRAP)
        # `g`: all registers, target byte order; aarch64: x0-x30, sp, then pc (64 bits each)
        registers = gdb.ask("g")
        pc = int.from_bytes(bytes.fromhex(registers[32 * 16:33 * 16]), "little")
        assert pc >= 0x40000000, f"pc {pc:#x} is not in the virt board's RAM"
        gdb.send("c")                                   # continue: no reply until it stops
    finally:
        gdb.close()
    kr.ok("wait", "dbg", "--for", "ready", "--timeout", "180")
    assert qmp_status(kr, "dbg")["running"] is True
    kr.ok("kill", "dbg")


def test_halted_stays_paused_until_resume(kr):
    g = guest("aarch64")
    profile = kr.profile("held", g, arch="aarch64")
    started = kr.ok("start", profile, "--halted")
    assert "halted:" in started.out
    time.sleep(3)
    status = qmp_status(kr, "held")
    assert (status["running"], status["status"]) == (False, "prelaunch")
    assert kr.status("held")["state"] == "paused"
    assert "KVMRUN" not in (kr.guest_dir("held") / "serial.log").read_text(errors="replace")
    assert "resumed held" in kr.ok("resume", "held").out
    kr.ok("wait", "held", "--for", "ready", "--timeout", "180")
    kr.ok("kill", "held")


def test_cmdline_shows_gdb_and_halted(kr):
    out = kr.ok("cmdline", "--arch", "riscv64", "--kernel", UBOOT, "--gdb", "--halted",
                "--json").out
    argv = json.loads(out)
    # `--gdb` alone: a unix socket in the private run directory (issue 12), not TCP 1234
    assert argv[argv.index("-gdb") + 1] == "chardev:gdb0" and "-S" in argv
    assert any(a.startswith("socket,id=gdb0,path=") and a.count("gdb.sock") == 1
               for a in argv)
    argv = json.loads(kr.ok("cmdline", "--gdb", "0.0.0.0:3333", "--arch", "arm", "--kernel",
                            UBOOT, "--json").out)
    assert argv[argv.index("-gdb") + 1] == "tcp:0.0.0.0:3333" and "-S" not in argv


# ---------------------------------------------------------------- shutdown by console

def test_console_method_types_poweroff(kr):
    """The guest without acpid ignores the power button; typing `poweroff -f` ends it."""
    g = guest("x86_64", "noacpi")
    profile = kr.profile("typed", g, arch="x86_64",
                         shutdown={"method": "console", "command": "poweroff -f",
                                   "timeout": 60})
    kr.start(profile)
    assert kr.status("typed")["shutdown_method"] == "console"
    stopped = kr.ok("stop", "typed")
    assert ("stopped typed: the guest powered off from its console (shutdown method console)"
            in stopped.out)
    assert shutdown_reasons(kr, "typed") == ["guest-shutdown"]
    assert "poweroff -f" in (kr.guest_dir("typed") / "serial.log").read_text(errors="replace")


# ---------------------------------------------------------------- run --console on a pty

def test_run_console_on_a_terminal_and_terminal_restored(kr):
    g = guest("aarch64")
    profile = kr.profile("tty", g, arch="aarch64",
                         shutdown={"method": "console", "command": "poweroff -f"})
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = kr.popen("run", profile, "--console", stdin=slave, stdout=slave, stderr=slave)
    seen = b""
    try:
        deadline = time.monotonic() + 180
        # the shell's prompt after the marker (busybox may follow it with a cursor query)
        while b"# " not in seen.partition(b"KVMRUN-GUEST-READY")[2]:
            assert time.monotonic() < deadline, seen[-2000:]
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 65536)
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0, "raw while attached"
        os.write(master, b"echo hello-from-$((6*7))\r")
        while b"hello-from-42" not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 65536)
        os.write(master, b"poweroff -f\r")
        while proc.poll() is None:
            assert time.monotonic() < deadline, seen[-2000:]
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=60) == 0
        assert termios.tcgetattr(slave) == before, "the terminal is restored"
    finally:
        os.close(master)
        os.close(slave)
    assert shutdown_reasons(kr, "tty") == ["guest-shutdown"]
