"""Resource limits (`limits:`): the profile keys and their located errors, the cgroup v2
files and systemd properties they become, the refusal where they cannot apply, and how
status shows them. The cgroup itself is exercised against a real cgroup2 mount in
tests/integration/test_limits.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrun import cli
from kvmrun.errors import HostError, ProfileError
from kvmrun.guest import cgroup
from kvmrun.profile import load


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))


def profile(limits: str) -> Path:
    Path("vm.yaml").write_text("name: vm\narch: x86_64\nmemory: 1G\nlimits:\n" + limits)
    return Path("vm.yaml")


def test_limits_load():
    p = load(profile("  cpu_weight: 50\n  cpu_max: 150%\n  memory_max: 2G\n  io_weight: 10\n"))
    assert p.limits.asked() == {"cpu_weight": 50, "cpu_max": 150, "memory_max": 2048,
                                "io_weight": 10}
    assert load(profile("  cpu_max: 50\n")).limits.asked() == {"cpu_max": 50}
    Path("plain.yaml").write_text("name: plain\n")
    assert load("plain.yaml").limits.asked() == {}


@pytest.mark.parametrize("limits, message", [
    ("  cpu_weight: 0\n", "vm.yaml:5: limits.cpu_weight: 0 is out of range (1 to 10000)"),
    ("  io_weight: 10001\n", "vm.yaml:5: limits.io_weight: 10001 is out of range (1 to 10000)"),
    ("  cpu_max: lots\n", "vm.yaml:5: limits.cpu_max: expected a percentage like 50% or 200%, "
                          "found 'lots'"),
    ("  cpu_max: 0%\n", "vm.yaml:5: limits.cpu_max: '0%' is out of range (1% to 102400%)"),
    ("  cpu_max: 99999999%\n", "vm.yaml:5: limits.cpu_max: expected a percentage"),
    ("  memory_max: 512M\n", "vm.yaml:5: limits.memory_max: 512 MiB is not above the guest's "
                             "memory (1024 MiB)"),
    ("  memory: 2G\n", "vm.yaml:5: limits.memory: unknown key"),
])
def test_limit_errors_are_located(limits, message):
    with pytest.raises(ProfileError) as err:
        load(profile(limits))
    assert str(err.value).startswith(message), str(err.value)


def test_limits_become_cgroup_files_and_systemd_properties():
    limits = {"cpu_weight": 50, "cpu_max": 150, "memory_max": 2048, "io_weight": 10}
    assert cgroup.limit_files(limits) == {
        "cpu.weight": "50", "cpu.max": "150000 100000", "memory.max": str(2 << 30),
        "io.weight": "default 10"}
    assert cgroup.scope_argv("vm", "0123456789ab", limits) == [
        "systemd-run", "--scope", "--quiet", "--collect", "--unit=kvmrun-vm-01234567",
        "-p", "CPUWeight=50", "-p", "CPUQuota=150%", "-p", "MemoryMax=2048M",
        "-p", "IOWeight=10", "--"]


def test_no_cgroup2_refuses_limits(monkeypatch):
    """Asked-for limits that cannot apply are refused at start (exit 3), never skipped."""
    monkeypatch.setattr(cgroup, "systemd_runs", lambda: False)
    monkeypatch.setattr(cgroup, "mount_point", lambda: None)
    monkeypatch.delenv("KVMRUN_CGROUP_ROOT", raising=False)
    assert cgroup.check({}) == "none"
    with pytest.raises(HostError, match="no cgroup v2 hierarchy mounted"):
        cgroup.check({"cpu_weight": 5})


def test_status_shows_limits():
    from kvmrun.cli.views import limits_text
    assert limits_text({"cpu_weight": 50, "cpu_max": 150, "memory_max": 2048}) == \
        "cpu_weight 50, cpu_max 150%, memory_max 2048M"


def test_cmdline_is_unchanged_by_limits(capsys):
    """Limits are applied around QEMU, not in its argv."""
    profile("  cpu_weight: 50\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["cmdline", "vm.yaml"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "cpu_weight" not in out and "-sandbox" in out


@pytest.mark.parametrize("value", ["9" * 5000, "150 %", "'%'", "-5%", "1e3%", "\u0661\u0660%"])
def test_odd_percentages_are_located_errors(value):
    Path("vm.yaml").write_text(f"name: vm\narch: x86_64\nlimits:\n  cpu_max: {value}\n")
    try:
        p = load("vm.yaml")
    except ProfileError as err:
        assert str(err).startswith("vm.yaml:4: limits.cpu_max: ") and len(str(err)) < 300
    else:
        assert p.limits.cpu_max == 150 and value == "150 %"
