"""The systemd pieces that need no running systemd: the environment drop-in (checked by
`systemd-analyze verify`, which parses unit files offline), the routing decision where
systemd does not run, and the errors of a systemctl that cannot reach systemd (this host's
real systemctl: it was not booted with systemd)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmrun.errors import GuestError, HostError, LaunchError, UsageError
from kvmrun.ops import systemd

ANALYZE = shutil.which("systemd-analyze")
BOOTED = Path("/run/systemd/system").is_dir()


def test_carried_env_is_the_kvmrun_variables_set_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    env = {"KVMRUN_RUN_DIR": "run", "KVMRUN_CONFIG_DIR": "/srv/kv", "KVMRUN_ACCEL": "tcg",
           "KVMRUN_DEBUG": "1", "KVMRUN_CACHE_DIR": "", "HOME": "/root"}
    assert systemd.carried_env(env) == {"KVMRUN_CONFIG_DIR": "/srv/kv",
                                        "KVMRUN_RUN_DIR": str(tmp_path / "run"),
                                        "KVMRUN_ACCEL": "tcg"}
    assert systemd.dropin_text(systemd.carried_env({})) is None      # defaults: no drop-in


def test_dropin_quotes_for_systemd_and_lifts_private_tmp():
    text = systemd.dropin_text({"KVMRUN_CONFIG_DIR": '/srv/my "vms" 100%',
                                "KVMRUN_RUN_DIR": "/tmp/kv-run"})
    lines = text.splitlines()
    assert "[Service]" in lines
    assert 'Environment="KVMRUN_CONFIG_DIR=/srv/my \\"vms\\" 100%%"' in lines
    assert 'Environment="KVMRUN_RUN_DIR=/tmp/kv-run"' in lines
    assert lines[-1] == "PrivateTmp=no"                 # /tmp would be the unit's own
    assert "PrivateTmp" not in systemd.dropin_text({"KVMRUN_RUN_DIR": "/srv/run"})
    assert "PrivateTmp" not in systemd.dropin_text({"KVMRUN_RUN_DIR": "/tmpfoo/run"})


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (apt-get install systemd)")
@pytest.mark.parametrize("unit", [systemd.UNIT, systemd.GUESTS])
def test_units_with_their_dropin_verify(tmp_path, monkeypatch, unit):
    """systemd-analyze loads the unit and its drop-in from the unit path and complains on
    stderr about any line it cannot parse (an Environment= with bad quoting among them)."""
    monkeypatch.setenv("KVMRUN_SYSTEMD_DIR", str(tmp_path))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", "/srv/my vms/100%")
    monkeypatch.setenv("KVMRUN_RUN_DIR", "/tmp/kvrun")
    name = systemd.instance("web1") if unit == systemd.UNIT else unit
    (tmp_path / unit).write_text(systemd.render(False, unit))
    if unit == systemd.UNIT:
        (tmp_path / name).symlink_to(tmp_path / unit)
    assert systemd.write_dropin(name, False) == tmp_path / f"{name}.d" / "kvmrun-env.conf"
    done = subprocess.run([ANALYZE, "verify", str(tmp_path / name)], capture_output=True,
                          text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    # the check can fail: a broken Environment= line is reported
    broken = tmp_path / f"{name}.d" / "kvmrun-env.conf"
    broken.write_text(broken.read_text().replace('Environment="', "Environment=\"\\q"))
    done = subprocess.run([ANALYZE, "verify", str(tmp_path / name)], capture_output=True,
                          text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert "kvmrun-env.conf:4: Invalid syntax" in done.stderr


def test_write_dropin_removes_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_SYSTEMD_DIR", str(tmp_path))
    for key in systemd.CARRIED:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KVMRUN_RUN_DIR", "/srv/run")
    path = systemd.write_dropin("kvmrun@a.service", False)
    assert path.read_text().count("Environment=") == 1
    monkeypatch.delenv("KVMRUN_RUN_DIR")
    assert systemd.write_dropin("kvmrun@a.service", False) is None and not path.exists()


@pytest.mark.skipif(BOOTED, reason="systemd runs here")
def test_no_routing_where_systemd_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path))
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "web1.yaml").write_text("name: web1\n")
    assert systemd.unit_for("web1", running_in="kvmrun@web1.service") is None


@pytest.mark.skipif(BOOTED or shutil.which("systemctl") is None,
                    reason="needs a systemctl that cannot reach systemd")
def test_systemctl_that_cannot_reach_systemd_is_a_host_error():
    """This host's real systemctl: "System has not been booted with systemd"."""
    for action, user in (("start", False), ("stop", False), ("start", True)):
        done = systemd.systemctl(user, action, "kvmrun@web1.service")
        assert done.returncode != 0
        error = systemd.failure(done, action, "kvmrun@web1.service", user)
        assert type(error) is HostError and error.exit_code == 3
        text = str(error)
        assert text.startswith(f"systemctl {action} kvmrun@web1.service failed (exit ")
        assert done.stderr.strip().splitlines()[0] in text     # systemctl's own words
        assert "--no-unit" in text


def test_failure_maps_a_failed_job_by_action():
    said = ("Job for kvmrun@web1.service failed because the control process exited with "
            "error code.")
    done = subprocess.CompletedProcess([], 1, "", said)
    start = systemd.failure(done, "start", "kvmrun@web1.service", False)
    assert type(start) is LaunchError and start.exit_code == 7 and said in str(start)
    assert "journalctl -u kvmrun@web1.service" in str(start)
    stop = systemd.failure(done, "stop", "kvmrun@web1.service", True)
    assert type(stop) is GuestError and "systemctl --user status" in str(stop)
    denied = subprocess.CompletedProcess([], 4, "", "Access denied")
    assert type(systemd.failure(denied, "start", "u", False)) is HostError


def test_options_a_unit_cannot_pass_are_refused():
    systemd.refuse_options("kvmrun@a.service", [])
    with pytest.raises(UsageError, match="cannot pass --memory, --set") as caught:
        systemd.refuse_options("kvmrun@a.service", ["--memory", "--set"])
    assert "--no-unit" in str(caught.value)
