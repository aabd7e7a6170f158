"""The light guest wing's records and error paths: the versioned launch record, the state
enum's JSON, the QMP client against a monitor that misbehaves (a peer QEMU cannot be made to
be), and the exit codes of usage errors."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from kvmrun.cli import main
from kvmrun.errors import GuestError, QMPError
from kvmrun.guest.launch import VERSION, LaunchRecord
from kvmrun.guest.qmp import QMPClient
from kvmrun.guest.rundir import Guest, State


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("KVMRUN_DATA_DIR", str(tmp_path / "data"))


def test_launch_record_round_trip_and_version(tmp_path):
    record = LaunchRecord(argv=["qemu-system-x86_64", "-m", "64"], disks=["/a.qcow2"],
                          ephemeral_disks=[0], shutdown_method="console",
                          summary={"forwards": ["tcp:127.0.0.1:2222-:22"]})
    record.write(tmp_path / "launch.json")
    data = json.loads((tmp_path / "launch.json").read_text())
    assert data["version"] == VERSION == 5
    back = LaunchRecord.read(tmp_path / "launch.json")
    assert back.to_json() == record.to_json()
    assert back.forwards == ["tcp:127.0.0.1:2222-:22"] and back.ephemeral_disks == [0]


def test_launch_record_of_kvmrun_0_1_reads_with_defaults(tmp_path):
    """kvmrun 0.1 wrote no version and, for old guests, fewer keys."""
    (tmp_path / "launch.json").write_text(json.dumps(
        {"argv": ["qemu"], "disks": ["/d"], "shutdown_timeout": 30}))
    old = LaunchRecord.read(tmp_path / "launch.json")
    assert old.version == 0 and old.shutdown_timeout == 30
    assert old.shutdown_method == "acpi" and old.shares == [] and old.forwards == []
    assert old.helpers == []                  # no helpers before version 4


def test_launch_record_v4_keeps_its_helpers(tmp_path):
    helpers = [{"name": "swtpm", "argv": ["/usr/bin/swtpm", "socket"], "socket": "/r/s.sock"}]
    LaunchRecord(argv=["qemu"], helpers=helpers).write(tmp_path / "launch.json")
    assert LaunchRecord.read(tmp_path / "launch.json").helpers == helpers


@pytest.mark.parametrize("content, message", [
    ('{"version": 99, "argv": []}', "newer than this kvmrun reads"),
    ('[]', "a launch record is a JSON object"),
    ('{"argv": [', "Expecting value"),
])
def test_unreadable_launch_records_are_value_errors(tmp_path, content, message):
    (tmp_path / "launch.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        LaunchRecord.read(tmp_path / "launch.json")


def test_state_is_a_string_in_json_and_text():
    assert json.dumps({"state": State.SHUTTING_DOWN}) == '{"state": "shutting-down"}'
    assert f"{State.RUNNING:<9}|" == "running  |" and str(State.CRASHED) == "crashed"
    assert State.PAUSED.live and not State.STOPPED.live


def test_state_record_carries_a_version():
    guest = Guest("vm")
    guest.paths.dir.mkdir(parents=True)
    guest.write_state({"state": State.RUNNING})
    assert json.loads(guest.paths.state.read_text()) == {"state": "running", "version": 1}


class Monitor:
    """A unix socket that answers the way a broken or hostile monitor might."""

    def __init__(self, path, replies: list[bytes]):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.replies = replies
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.sock.accept()
        with conn:
            for reply in self.replies:
                conn.sendall(reply)
                if reply.endswith(b"\n") and reply != self.replies[-1]:
                    conn.recv(4096)             # the client's command
            self.closed = conn.recv(4096) == b""    # the client hung up

    def close(self):
        self.thread.join(5)
        self.sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_greeting_closes_the_socket(tmp_path):
    before = open_fds()
    monitor = Monitor(tmp_path / "m.sock", [b'{"hello": 1}\n'])
    with pytest.raises(QMPError, match="unexpected QMP greeting"):
        QMPClient(tmp_path / "m.sock", timeout=2).connect()
    monitor.close()
    assert monitor.closed and open_fds() == before


def test_not_json_and_error_classes(tmp_path):
    greeting = b'{"QMP": {"version": {}, "capabilities": []}}\n'
    monitor = Monitor(tmp_path / "m.sock", [greeting, b'{"return": {}}\n',
                                            b'{"error": {"class": "DeviceNotFound", '
                                            b'"desc": "no disk9"}}\n'])
    client = QMPClient(tmp_path / "m.sock", timeout=2).connect()
    with pytest.raises(QMPError) as err:
        client.execute("block_resize", {"device": "disk9", "size": 1})
    assert (err.value.command, err.value.error_class) == ("block_resize", "DeviceNotFound")
    assert err.value.exit_code == 6 and "no disk9" in str(err.value)
    client.close()
    monitor.close()
    monitor = Monitor(tmp_path / "n.sock", [b"garbage\n"])
    with pytest.raises(QMPError, match="not JSON"):
        QMPClient(tmp_path / "n.sock", timeout=2).connect()
    monitor.close()


def test_no_socket_is_a_guest_error(tmp_path):
    with pytest.raises(GuestError, match="no QMP socket"):
        QMPClient(tmp_path / "none.sock").connect()


@pytest.mark.parametrize("args, message", [
    (["wait", "vm", "--for", "bogus"], "--for 'bogus': expected running, stopped or ready"),
    (["qmp", "vm", "query-status", "{not json"], "JSON-ARGS is not valid JSON"),
    (["qmp", "vm", "query-status", "[1]"], "JSON-ARGS must be a JSON object"),
    (["status", "bad,name"], "'bad,name' is not a valid VM name"),
])
def test_usage_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
