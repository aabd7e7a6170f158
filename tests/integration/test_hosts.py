"""`-H/--host`: verbs run on another "host" (a network namespace with its own sshd and kvmrun
directories, tests/integration/hosts.py) through the real ssh; one guest is shared by the
checks of `start`, `list`, `status` and `stop`."""

from __future__ import annotations

import json

import yaml

from tests.integration.hosts import hosts  # noqa: F401 - the fixture


def _use(kr, hosts):
    kr.env = hosts.env(kr.env)
    return kr


def test_ssh_failures_are_one_line_exit_3(kr, hosts):
    kr = _use(kr, hosts)
    for args, env, says in [
        (["-H", "nohost.invalid", "list"], {}, "kvmrun: error: cannot reach nohost.invalid"),
        (["list", "--host", "hosta-badkey"], {},
         "kvmrun: error: cannot log in to hosta-badkey: root@"),
        (["-H", "hosta", "list"], {"KVMRUN_REMOTE_COMMAND": "no-kvmrun-here"},
         "kvmrun: error: hosta has no no-kvmrun-here"),
    ]:
        code, out, err = kr.run(*args, env={**kr.env, **env})
        assert code == 3, (args, code, out, err)
        assert out == ""
        assert err.startswith(says) and err.count("\n") == 1, err
    code, out, err = kr.run("-H", "hosta:notaport", "list")
    assert code == 2 and "expected [USER@]HOST[:PORT]" in err


def test_start_list_status_stop_on_another_host(kr, hosts, tiny_guest):
    kr = _use(kr, hosts)
    base = kr.profile("base", tiny_guest)
    web = kr.base / "web.yaml"
    web.write_text(yaml.safe_dump({"extends": "base.yaml", "name": "web", "memory": "192M"}))
    # a path that does not exist there is named before anything starts
    bad = kr.base / "bad.yaml"
    bad.write_text(yaml.safe_dump({"extends": "base.yaml", "name": "bad",
                                   "disks": [{"path": str(kr.base / "nowhere.qcow2")}]}))
    code, out, err = kr.run("start", "-H", "hosta", "./bad.yaml")
    assert code == 2, err
    assert f"'{kr.base}/nowhere.qcow2' does not exist on hosta" in err
    assert "disks[0]" in err

    kr.ok("start", "-H", "hosta", "./web.yaml")
    assert not (kr.run_dir / "web").exists()           # it runs there, not here
    info = json.loads(kr.ok("-H", "hosta", "status", "web", "--json").out)
    assert info["state"] == "running" and info["memory_mib"] == 192
    assert info["run_dir"] == str(hosts["a"].run_dir / "web")
    assert str(base) not in json.dumps(info)           # it ran from the sent copy

    # the remote's exit codes and messages come back unchanged
    code, out, err = kr.run("-H", "hostb", "status", "web")
    assert code == 4 and err.startswith("kvmrun: error: no guest named 'web'")
    code, _, _ = kr.run("status", "web")
    assert code == 4

    rows = json.loads(kr.ok("list", "-H", "hosta", "-H", "hostb", "--json").out)
    assert [(r["host"], r["name"], r["state"]) for r in rows] == [("hosta", "web", "running")]
    table = kr.ok("list", "-H", "hosta", "-H", "hostb").out.splitlines()
    assert table[0].split()[:3] == ["HOST", "NAME", "STATE"]
    assert table[1].split()[:3] == ["hosta", "web", "running"]
    single = json.loads(kr.ok("list", "-H", "hosta", "--json").out)
    assert "host" not in single[0]                     # one host: its output unchanged

    kr.ok("stop", "-H", "hosta", "web")
    info = json.loads(kr.ok("-H", "hosta", "status", "web", "--json").out)
    assert info["state"] == "stopped" and info["pid"] is None
    assert not any(str(hosts["a"].run_dir) in c for c in map(str, hosts.processes()))
    # the temporary copy of the profile is gone there
    left = hosts.ssh_run("a", "ls -d ${TMPDIR:-/tmp}/kvmrun-profile.* 2>/dev/null | wc -l")
    assert left.stdout.strip() == "0"
