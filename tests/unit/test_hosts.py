"""The pure parts of remote control and migration: --host parsing, taking -H out of a
command line, the target's rewrite of a launch record's argv and helpers (swtpm), the
refusal of a virtiofs share live, the end "migrated to HOST",
and version-1 launch records read by version 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrun.errors import MigrationError, RemoteError, UsageError
from kvmrun.guest import exits
from kvmrun.guest.launch import VERSION, LaunchRecord
from kvmrun.guest.rundir import Guest
from kvmrun.ops import migrate, migrate_target, remote


@pytest.mark.parametrize("spec, dest, port", [
    ("web", "web", None), ("root@web:2222", "root@web", 2222),
    ("[::1]:22", "::1", 22), ("u@10.0.0.2", "u@10.0.0.2", None)])
def test_parse_host(spec, dest, port):
    host = remote.parse_host(spec)
    assert (host.destination, host.port, str(host)) == (dest, port, spec)


@pytest.mark.parametrize("spec", ["", "a b", "web:port", "web:70000", "@web"])
def test_bad_hosts_are_usage_errors(spec):
    with pytest.raises(UsageError, match="expected|out of range"):
        remote.parse_host(spec)


def test_split_hosts_anywhere_before_the_double_dash(monkeypatch):
    monkeypatch.delenv("KVMRUN_HOST", raising=False)
    hosts, rest = remote.split_hosts(["list", "-H", "a", "--host=b", "-Hc", "--json", "--",
                                      "-H", "x"])
    assert [h.spec for h in hosts] == ["a", "b", "c"]
    assert rest == ["list", "--json", "--", "-H", "x"]
    monkeypatch.setenv("KVMRUN_HOST", "envhost")
    assert [h.spec for h in remote.split_hosts(["list"])[0]] == ["envhost"]
    assert remote.split_hosts(["-H", "", "list"])[0] == []      # -H '': here, not $KVMRUN_HOST
    with pytest.raises(UsageError):
        remote.split_hosts(["list", "-H"])


def test_ssh_argv_quotes_the_remote_command(monkeypatch):
    monkeypatch.setenv("KVMRUN_SSH", "ssh -F './my config'")
    monkeypatch.setenv("KVMRUN_REMOTE_COMMAND", "/opt/kvmrun/bin/kvmrun")
    argv = remote.ssh_argv(remote.parse_host("me@box:2200"),
                           remote.kvmrun_words(["start", "a b.yaml"]), tty=True)
    assert argv == ["ssh", "-F", "./my config", "-t", "-p", "2200", "--", "me@box",
                    "/opt/kvmrun/bin/kvmrun start 'a b.yaml'"]


def test_ssh_failures_become_one_line():
    class Relay:
        held = ["ssh: connect to host box port 22: Connection refused\n"]
    host = remote.parse_host("box")
    failure = remote.failure_of(host, 255, Relay, "kvmrun")
    assert isinstance(failure, RemoteError) and failure.exit_code == 3
    assert str(failure) == "cannot reach box over ssh: connect to host box port 22: " \
                           "Connection refused"
    assert remote.never_connected(failure)
    Relay.held = ["bash: line 1: kvmrun: command not found\n"]
    assert "box has no kvmrun" in str(remote.failure_of(host, 127, Relay, "kvmrun"))
    assert remote.failure_of(host, 4, Relay, "kvmrun") is None   # the remote's own code


def test_target_argv_rewrite(tmp_path):
    guest = Guest("web", tmp_path / "b")
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg",
            "-drive", "file=/a/disk,,1.qcow2,format=qcow2,if=none,id=drive-disk0",
            "-chardev", "socket,id=serial0,path=/ra/web/console.sock,logfile=/ra/web/"
                        "serial.log,logappend=on",
            "-drive", "if=pflash,format=raw,unit=1,file=/da/nvram/web_VARS.fd"]
    req = {"source_dir": "/ra/web", "source_nvram": "/da/nvram/web_VARS.fd",
           "machine": "pc-q35-7.2",
           "disks": [{"source": "/a/disk,1.qcow2", "target": "/b/d,1.qcow2", "copy": True}]}
    out = migrate_target._rewrite(argv, req, guest)
    there = str(guest.paths.dir)
    assert out == ["qemu-system-x86_64", "-machine", "pc-q35-7.2,accel=tcg",
                   "-drive", "file=/b/d,,1.qcow2,format=qcow2,if=none,id=drive-disk0",
                   "-chardev", f"socket,id=serial0,path={there}/console.sock,"
                               f"logfile={there}/serial.log,logappend=on",
                   "-drive", f"if=pflash,format=raw,unit=1,file={guest.paths.nvram}",
                   "-incoming", "defer", "-S"]


def test_target_swtpm_gets_this_hosts_socket_and_state_dir(tmp_path):
    guest = Guest("web", tmp_path / "b")
    helpers = [{"name": "swtpm", "socket": "/ra/web/helper-swtpm.sock", "argv": [
        "/usr/bin/swtpm", "socket", "--tpm2", "--tpmstate", "dir=/da/tpm/web,mode=0600",
        "--ctrl", "type=unixio,path=/ra/web/helper-swtpm.sock,mode=0600"]}]
    req = {"source_dir": "/ra/web", "source_tpm": "/da/tpm/web"}
    [out] = migrate_target._rewrite_helpers(helpers, req, guest)
    sock = str(guest.paths.helper_socket("swtpm"))
    assert out == {"name": "swtpm", "socket": sock, "argv": [
        "/usr/bin/swtpm", "socket", "--tpm2", "--tpmstate", f"dir={guest.paths.tpm},mode=0600",
        "--ctrl", f"type=unixio,path={sock},mode=0600"]}


def test_live_migration_refuses_a_virtiofs_share_by_name():
    record = LaunchRecord.from_json({
        "version": VERSION, "argv": ["qemu"], "summary": {},
        "shares": [{"path": "/srv/data", "tag": "data", "readonly": False, "type": "virtiofs"}],
        "helpers": [{"name": "virtiofsd0", "argv": ["virtiofsd"], "socket": "/r/v.sock"},
                    {"name": "swtpm", "argv": ["swtpm"], "socket": "/r/s.sock"}]})
    with pytest.raises(MigrationError, match=r"web has a virtiofs share \(data \(/srv/data\)\)"
                       r": QEMU cannot migrate a vhost-user-fs device live"):
        migrate._check_helpers("web", record)
    tpm_only = LaunchRecord.from_json({
        "version": VERSION, "argv": ["qemu"], "summary": {},
        "helpers": [{"name": "swtpm", "argv": ["swtpm"], "socket": "/r/s.sock"}]})
    migrate._check_helpers("web", tpm_only)         # a TPM moves along


def test_migrated_is_a_clean_end():
    ended, code = exits.classify(0, "host-qmp-quit", False,
                                  {"action": "migrate", "by": "hostb"})
    assert (ended["reason"], ended["detail"], code) == ("migrated", "migrated to hostb",
                                                        exits.EXIT_CLEAN)
    ended, code = exits.classify(-9, None, False, {"action": "migrate", "by": "hostb"})
    assert ended["reason"] == "crashed"             # a QEMU that died did not migrate


def test_launch_record_v1_reads_with_no_machine_type(tmp_path: Path):
    assert VERSION >= 3
    old = LaunchRecord.from_json({"version": 1, "argv": ["qemu"], "summary": {}})
    assert old.machine_type is None and old.version == 1
    new = LaunchRecord(argv=["qemu"], machine_type="pc-i440fx-7.2")
    assert LaunchRecord.from_json(new.to_json()).machine_type == "pc-i440fx-7.2"
    assert old.cgroup is None                  # v4's cgroup: none in older records


def _target_session(monkeypatch, tmp_path):
    """A guest `web` as a target's prepare leaves it (its record lists a disk it made), and
    migrate_target.session serving it on pipes in a thread."""
    import json
    import os
    import threading
    from kvmrun.ops import migrate_target
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    disk = tmp_path / "web.qcow2"
    disk.write_bytes(b"made by prepare")
    (tmp_path / "run" / "web").mkdir(parents=True)
    (tmp_path / "run" / "web" / "migration.json").write_text(json.dumps(
        {"role": "target", "made": {"disks": [str(disk)], "dir": True}}))
    to_it, ours = os.pipe()
    theirs, from_it = os.pipe()
    server = threading.Thread(target=migrate_target.session,
                              args=({"name": "web"}, b"", to_it, from_it), daemon=True)
    server.start()
    reader = os.fdopen(theirs, "rb")

    def ask(line: bytes) -> dict:
        os.write(ours, line + b"\n")
        return json.loads(reader.readline())
    return server, ours, ask, disk


def test_target_session_answers_each_step_and_aborts_on_eof(monkeypatch, tmp_path):
    """One session carries every step (a JSON line each way); a failed step is an answer,
    not the session's end; EOF (the source is gone) removes what prepare made."""
    import os
    server, ours, ask, disk = _target_session(monkeypatch, tmp_path)
    assert ask(b'{"step": "nope"}') == {"error": "unknown step"}
    os.write(ours, b"alive\n")
    answer = ask(b'{"step": "preflight", "name": "web", "binary": "no-such-qemu-krt", '
                 b'"qemu_version": "7.2.0", "machine": "pc", "disks": []}')
    assert answer == {"result": {"problems": ["no-such-qemu-krt is not installed"]}}
    assert disk.exists()
    os.close(ours)
    server.join(10)
    assert not server.is_alive()
    assert not disk.exists() and not (tmp_path / "run" / "web").exists()


def test_target_session_done_keeps_what_it_made(monkeypatch, tmp_path):
    import os
    server, ours, ask, disk = _target_session(monkeypatch, tmp_path)
    assert ask(b'{"step": "abort", "name": "other"}') == {"result": {"ok": True,
                                                                     "removed": []}}
    os.write(ours, b"done\n")
    server.join(10)
    assert not server.is_alive() and disk.exists()
    os.close(ours)


def test_the_target_qemu_drops_to_the_sources_user():
    """A target's QEMU keeps the source's `-runas` (or `-run-with user=`); a user other
    than kvmrun's default that does not exist there is a preflight problem."""
    from kvmrun.ops.migrate_preflight import _user_problem, argv_user
    assert argv_user(["qemu", "-runas", "kvmrun", "-S"]) == "kvmrun"
    assert argv_user(["qemu", "-run-with", "user=web,chroot=/x"]) == "web"
    assert argv_user(["qemu", "-run-with", "async-teardown=on"]) is None
    assert argv_user(["qemu", "-S"]) is None
    assert _user_problem(["qemu", "-runas", "kvmrun"]) is None      # made there on demand
    assert _user_problem(["qemu", "-runas", "root"]) is None
    assert _user_problem(["qemu", "-runas", "no-such-user-krt"]) == \
        "the user 'no-such-user-krt' its QEMU runs as does not exist here"
