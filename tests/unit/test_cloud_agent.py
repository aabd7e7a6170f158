"""Cloud guests without a guest: the seed's rendering, ready.cloud_init, the bus warnings,
`kvmrun ssh`'s defaults and sshd wait, and the guest agent client's protocol handling.

The real guest (tests/integration/test_debian.py) shows that all of it works against Debian's
cloud-init, sshd and qemu-guest-agent. The fake agent here exists only for what a real agent
cannot be made to do on cue: leave a stale reply in the pipe, stay silent, hang up, refuse.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest

from kvmrun.cli.app import json_object

from kvmrun.errors import (AgentError, AgentTimeout, GuestError, GuestTimeout, ProfileError,
                           QMPError)
from kvmrun.guest import agent as qga
from kvmrun.ops import ssh as sshcmd
from kvmrun.profile import CLOUD_INIT_FINISHED, load, warnings
from kvmrun.storage import cloudinit


def write(tmp_path: Path, text: str, name: str = "vm.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the seed

def test_hostname_manages_etc_hosts(tmp_path):
    p = load(write(tmp_path, "cloud_init: {hostname: box}\n"))
    user = cloudinit.render(p)["user-data"]
    assert "manage_etc_hosts: true" in user and "hostname: box" in user


def test_user_data_keeps_its_own_manage_etc_hosts(tmp_path):
    p = load(write(tmp_path, "cloud_init:\n  hostname: box\n"
                             "  user_data: {manage_etc_hosts: localhost}\n"))
    assert "manage_etc_hosts: localhost" in cloudinit.render(p)["user-data"]


def test_no_hostname_no_manage_etc_hosts(tmp_path):
    p = load(write(tmp_path, "cloud_init: {password: x}\n"))
    assert "manage_etc_hosts" not in cloudinit.render(p)["user-data"]


def test_seed_interface_is_checked(tmp_path):
    with pytest.raises(ProfileError, match=r"cloud_init\.interface.*virtio, ide, scsi"):
        load(write(tmp_path, "cloud_init: {interface: sata}\n"))


# ---------------------------------------------------------------- ready.cloud_init

def test_ready_cloud_init_waits_for_the_final_line(tmp_path):
    p = load(write(tmp_path, "ready: {cloud_init: true}\n"))
    assert p.ready.pattern == CLOUD_INIT_FINISHED
    line = ("[  126.509583] cloud-init[468]: Cloud-init v. 22.4.2 finished at Tue, 01 Dec 2026 "
            "22:12:11 +0000. Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up "
            "126.39 seconds")
    assert re.search(p.ready.pattern, line)
    assert not re.search(p.ready.pattern, "Cloud-init v. 22.4.2 running 'modules:final' at")
    assert load(write(tmp_path, "ready: {console: 'login:'}\n")).ready.pattern == "login:"
    assert load(write(tmp_path, "name: x\n")).ready.pattern is None


def test_ready_console_and_cloud_init_exclude_each_other(tmp_path):
    with pytest.raises(ProfileError, match="give ready.console or ready.cloud_init, not both"):
        load(write(tmp_path, "ready: {console: 'login:', cloud_init: true}\n"))


# ---------------------------------------------------------------- bus warnings

def _warned(tmp_path, text: str) -> list[str]:
    return [str(w) for w in warnings(load(write(tmp_path, text)))]


def test_cdrom_on_q35_warns_about_ahci(tmp_path):
    (tmp_path / "x.iso").write_bytes(b"")
    found = _warned(tmp_path, "arch: x86_64\ncdrom: x.iso\n")
    assert len(found) == 1 and "vm.yaml:2: cdrom: on the q35 machine a CD-ROM is an ide-cd " \
                                "on its SATA AHCI controller" in found[0]
    assert "CONFIG_SATA_AHCI" in found[0]
    assert _warned(tmp_path, "arch: x86_64\nmachine: pc\ncdrom: x.iso\n") == []
    assert _warned(tmp_path, "arch: aarch64\ncdrom: x.iso\n") == []     # virtio-scsi there


def test_ide_seed_on_q35_warns_and_virtio_does_not(tmp_path):
    found = _warned(tmp_path, "arch: x86_64\ncloud_init: {interface: ide}\n")
    assert len(found) == 1 and "cloud_init.interface" in found[0]
    assert _warned(tmp_path, "arch: x86_64\ncloud_init: {}\n") == []


# ---------------------------------------------------------------- kvmrun ssh

def test_ssh_identity_defaults_to_the_private_half(tmp_path):
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAA x@y\n")
    text = "cloud_init: {ssh_authorized_keys: [ssh-rsa AAAAinline a@b, id.pub]}\n"
    p = load(write(tmp_path, text))
    assert sshcmd.login_defaults(p) == {"user": None, "identity": None}   # no private half
    (tmp_path / "id").write_text("PRIVATE\n")
    assert sshcmd.login_defaults(p) == {"user": None, "identity": str(tmp_path / "id")}
    (tmp_path / "other").write_text("PRIVATE\n")
    p = load(write(tmp_path, text + "ssh: {user: debian, identity: other}\n"))
    assert sshcmd.login_defaults(p) == {"user": "debian", "identity": str(tmp_path / "other")}


def test_pub_key_files_resolve_against_the_profile_and_must_exist(tmp_path):
    """A .pub path is relative to the profile's file (so a defined copy elsewhere still finds
    it), a key written out is left alone, and a missing .pub file is reported by validate."""
    from kvmrun.profile import referenced_files
    from kvmrun.qemu.checks import missing_files
    (tmp_path / "keys").mkdir()
    text = "cloud_init: {ssh_authorized_keys: [keys/id.pub, ssh-rsa AAAAinline a@b]}\n"
    p = load(write(tmp_path, text))
    assert p.cloud_init.ssh_authorized_keys == (str(tmp_path / "keys" / "id.pub"),
                                                "ssh-rsa AAAAinline a@b")
    assert [(str(loc), what) for loc, what, _ in referenced_files(p)] == [
        (f"{tmp_path / 'vm.yaml'}:1: cloud_init.ssh_authorized_keys[0]", "public key file")]
    assert [e.reason for e in missing_files(p)] == [
        f"public key file {str(tmp_path / 'keys' / 'id.pub')!r} not found"]
    (tmp_path / "keys" / "id.pub").write_text("ssh-ed25519 AAAA x@y\n")
    assert missing_files(p) == []
    assert "ssh-ed25519 AAAA x@y" in cloudinit.render(p)["user-data"]


def test_ssh_explains_a_refused_root():
    assert "log in as the image's default user" in sshcmd.explain(142, None)
    assert "ssh: {user: debian}" in sshcmd.explain(142, "root")
    assert sshcmd.explain(142, "debian") is None        # the user's own command said 142
    assert sshcmd.explain(0, None) is None


class Listener:
    """A loopback TCP server: closes the first `closes` connections at once (as QEMU's user
    network does while the guest's port 22 is shut), then sends an ssh banner."""

    def __init__(self, closes: int):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.closes, self.seen = closes, 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                self.seen += 1
                with conn:
                    if self.seen > self.closes:
                        conn.sendall(b"SSH-2.0-test\r\n")
                        return
        except OSError:
            return

    def close(self):
        self.sock.close()
        self.thread.join(30)


def test_wait_for_sshd_waits_until_the_banner():
    server = Listener(closes=2)
    notes = []
    try:
        sshcmd.wait_for_sshd("vm", "127.0.0.1", server.port, 60, note=notes.append)
    finally:
        server.close()
    assert server.seen == 3
    assert notes == [f"kvmrun: waiting for the sshd of vm on 127.0.0.1:{server.port} "
                     "(up to 60s)…"]


def test_wait_for_sshd_gives_up():
    server = Listener(closes=10**6)
    try:
        with pytest.raises(GuestTimeout, match="did not answer on 127.0.0.1:.* within 1s"):
            sshcmd.wait_for_sshd("vm", "127.0.0.1", server.port, 1)
    finally:
        server.close()
    assert GuestTimeout.exit_code == 5


# ---------------------------------------------------------------- the agent client

class FakeAgent:
    """A unix-socket agent that plays a script: `replies` maps a command to the bytes it
    answers (a callable gets the parsed message). guest-sync-delimited answers like the
    real agent (0xFF, then the id) unless `sync` says otherwise."""

    def __init__(self, path: Path, replies: dict, stale: bytes = b"", sync=True):
        self.path, self.replies, self.stale, self.sync = path, replies, stale, sync
        self.received: list[dict] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.server.settimeout(30)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            buf = b""
            if self.stale:
                conn.sendall(self.stale)
            while True:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line.lstrip(b"\xff"))
                    self.received.append(msg)
                    reply = self.answer(msg)
                    if reply == b"HANGUP":
                        return
                    if reply:
                        conn.sendall(reply)

    def answer(self, msg) -> bytes | None:
        cmd = msg["execute"]
        if cmd == "guest-sync-delimited":
            if self.sync is True:
                return b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n"
            return self.sync(msg) if callable(self.sync) else None
        reply = self.replies.get(cmd)
        return reply(msg) if callable(reply) else reply

    def close(self):
        self.server.close()
        self.thread.join(30)


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(*args, **kwargs):
        agent = FakeAgent(tmp_path / "qga.sock", *args, **kwargs)
        made.append(agent)
        return agent
    yield make
    for agent in made:
        agent.close()


def ret(value) -> bytes:
    return json.dumps({"return": value}).encode() + b"\n"


def test_stale_output_before_the_delimiter_is_dropped(tmp_path, fake):
    stale = ret({"old": "answer"}) + b'{"return": 7}\n'     # an earlier client's replies

    def sync(msg):        # a reply for another sync id after the delimiter, then ours
        return (b"\xff" + ret(12345) + b"garbage\n"
                + ret(msg["arguments"]["id"]))
    agent = fake({"guest-ping": ret({})}, stale=stale, sync=sync)
    with qga.Agent(tmp_path / "qga.sock", timeout=10) as client:
        assert client.call("guest-ping") == {}
    assert [m["execute"] for m in agent.received] == ["guest-sync-delimited", "guest-ping"]


def test_a_silent_agent_times_out(tmp_path, fake):
    fake({}, sync=False)
    with pytest.raises(AgentTimeout, match="did not answer guest-sync-delimited within "
                                               "0.3s") as info:
        qga.Agent(tmp_path / "qga.sock", timeout=0.3, name="web").connect()
    assert info.value.exit_code == 5 and "qemu-guest-agent" in info.value.hint


def test_a_command_without_answer_times_out(tmp_path, fake):
    fake({"guest-info": None})
    with qga.Agent(tmp_path / "qga.sock", timeout=0.3) as client:
        with pytest.raises(AgentTimeout, match="did not answer guest-info"):
            client.call("guest-info")


def test_an_agent_that_hangs_up(tmp_path, fake):
    fake({"guest-info": b"HANGUP"})
    with qga.Agent(tmp_path / "qga.sock", timeout=5) as client:
        with pytest.raises(GuestError, match="closed while waiting for guest-info") as info:
            client.call("guest-info")
    assert not isinstance(info.value, GuestTimeout)


def test_errors_keep_their_class(tmp_path, fake):
    fake({"guest-nope": json.dumps({"error": {"class": "CommandNotFound",
                                              "desc": "no such command"}}).encode() + b"\n"})
    with qga.Agent(tmp_path / "qga.sock", timeout=5) as client:
        with pytest.raises(AgentError) as info:
            client.call("guest-nope")
    assert info.value.error_class == "CommandNotFound" and isinstance(info.value, QMPError)
    assert str(info.value) == "the guest agent refused guest-nope: no such command " \
                              "(CommandNotFound)"


def test_no_socket_names_the_profile_key(tmp_path):
    with pytest.raises(GuestError, match="has no guest agent socket") as info:
        qga.Agent(tmp_path / "qga.sock", name="web").connect()
    assert "devices: [agent]" in info.value.hint


def test_shutdown_expects_no_reply(tmp_path, fake):
    agent = fake({})
    with qga.Agent(tmp_path / "qga.sock", timeout=5) as client:
        assert client.call("guest-shutdown", {"mode": "powerdown"}) is None
    agent.close()
    assert agent.received[-1] == {"execute": "guest-shutdown",
                                  "arguments": {"mode": "powerdown"}}


def test_exec_polls_until_exit(tmp_path, fake):
    import base64
    polls = []

    def status(msg):
        polls.append(msg["arguments"]["pid"])
        if len(polls) < 3:
            return ret({"exited": False})
        return ret({"exited": True, "exitcode": 3,
                    "out-data": base64.b64encode(b"out\n").decode(),
                    "err-data": base64.b64encode(b"err\n").decode()})
    agent = fake({"guest-exec": ret({"pid": 42}), "guest-exec-status": status})
    with qga.Agent(tmp_path / "qga.sock", timeout=5) as client:
        result = qga.run_command(client, ["sh", "-c", "exit 3"], 30, stdin=b"in", poll=0.01)
    assert result == {"exitcode": 3, "signal": None, "stdout": b"out\n", "stderr": b"err\n",
                      "truncated": False}
    assert polls == [42, 42, 42] and qga.exit_status(result) == 3
    assert agent.received[1]["arguments"] == {"path": "sh", "arg": ["-c", "exit 3"],
                                              "capture-output": True, "input-data": "aW4="}
    assert qga.exit_status({"exitcode": None, "signal": 9}) == 137


def test_addresses_flatten():
    rows = qga.addresses([{"name": "eth0", "hardware-address": "52:54:00:00:00:01",
                           "ip-addresses": [{"ip-address-type": "ipv4",
                                             "ip-address": "10.0.2.15", "prefix": 24}]},
                          {"name": "dummy0", "hardware-address": "aa:bb:cc:dd:ee:ff"}])
    assert rows == [{"interface": "eth0", "mac": "52:54:00:00:00:01", "family": "ipv4",
                     "address": "10.0.2.15", "prefix": 24},
                    {"interface": "dummy0", "mac": "aa:bb:cc:dd:ee:ff", "family": None,
                     "address": None, "prefix": None}]


# ---------------------------------------------------------------- the agent verbs

def test_agent_json_args_are_checked():
    from kvmrun.errors import UsageError
    assert json_object('{"pid": 812}') == {"pid": 812}
    assert json_object(None) is None
    with pytest.raises(UsageError, match="JSON-ARGS is not valid JSON") as info:
        json_object("{pid: 812}")
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="must be a JSON object"):
        json_object("[1, 2]")


@pytest.mark.parametrize("args", [["agent", "nosuch", "guest-ping"], ["ip", "nosuch"],
                                  ["exec", "nosuch", "--", "true"]])
def test_agent_verbs_need_a_running_guest(tmp_path, monkeypatch, capsys, args):
    from kvmrun.cli import main
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 4
    assert capsys.readouterr().err.startswith("kvmrun: error: nosuch is not running")


# ---------------------------------------------------------------- fsfreeze around a snapshot
# (the real agent freezes and thaws in tests/integration/test_debian.py; these are the paths a
# real agent cannot be made to take on cue: a refused freeze, a savevm that fails meanwhile)

class _Launch:
    argv = ["qemu", "-device", f"virtserialport,chardev=qga,name={qga.AGENT_PORT}"]


class _Guest:
    """What kvmrun.ops.agent.frozen reads of a running guest: its launch and socket."""

    def __init__(self, sock: Path):
        self.name = "vm"
        self.paths = type("P", (), {"qga": sock})()

    def launch_or_none(self):
        return _Launch()


def test_a_failed_snapshot_still_thaws(tmp_path, fake):
    from kvmrun.ops import agent as agentops
    agent = fake({"guest-fsfreeze-freeze": ret(2), "guest-fsfreeze-thaw": ret(2)})
    with pytest.raises(QMPError, match="savevm failed"):
        with agentops.frozen(_Guest(tmp_path / "qga.sock")) as state:
            assert state.frozen and state.note is None
            raise QMPError("savevm failed")
    assert [m["execute"] for m in agent.received] == [
        "guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_a_refused_freeze_is_crash_consistent_with_a_note(tmp_path, fake):
    from kvmrun.ops import agent as agentops
    refused = json.dumps({"error": {"class": "GenericError",
                                    "desc": "fsfreeze is disabled"}}).encode() + b"\n"
    agent = fake({"guest-fsfreeze-freeze": refused, "guest-fsfreeze-thaw": ret(0)})
    notes = []
    with agentops.frozen(_Guest(tmp_path / "qga.sock"), notes.append) as state:
        pass
    assert state.frozen is False
    assert notes == [f"kvmrun: note: {state.note}"]
    assert state.note.startswith("the guest agent did not freeze the file systems (")
    assert "fsfreeze is disabled" in state.note and state.note.endswith("crash-consistent")
    # a freeze cut short may have frozen some: thawed all the same, once
    assert [m["execute"] for m in agent.received] == [
        "guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_no_agent_port_is_crash_consistent_without_a_word(tmp_path):
    from kvmrun.ops import agent as agentops
    guest = _Guest(tmp_path / "qga.sock")
    guest.launch_or_none = lambda: type("L", (), {"argv": ["qemu"]})()
    notes = []
    with agentops.frozen(guest, notes.append) as state:
        pass
    assert (state.frozen, notes) == (False, [])
    assert "no guest agent port" in state.note
