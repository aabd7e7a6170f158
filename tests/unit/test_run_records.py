"""Run-directory records under faults (issue 12, bugs 2, 7, 10, 12): a corrupt state.json
spoils only its own guest, requests are written into a reserved page (no free space
needed), the end of a guest is written in place on a full disk, `logs -n` reads from the
end, and directories of other owners are refused.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from kvmrun import cli, files
from kvmrun.cli.power import tail
from kvmrun.errors import HostError
from kvmrun.guest.exits import classify
from kvmrun.guest.rundir import Guest, State, trusted


@pytest.fixture
def run(tmp_path, monkeypatch):
    base = tmp_path / "run"
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(base))
    for name, state in (("good", {"name": "good", "state": "stopped",
                                  "ended": {"reason": "guest-shutdown", "detail": "off"}}),
                        ("bad", []), ("cut", '{"name": "cut", "sta')):
        (base / name).mkdir(parents=True, mode=0o700)
        (base / name / "state.json").write_text(
            state if isinstance(state, str) else json.dumps(state))
    os.chmod(base, 0o700)
    return base


def test_one_bad_state_does_not_break_list(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["list", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert exit_.value.code == 0
    assert rows["good"]["state"] == "stopped" and rows["good"]["ended"] == "guest-shutdown"
    assert rows["bad"]["state"] == rows["cut"]["state"] == "unreadable"


def test_status_of_an_unreadable_record(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status", "bad", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 0
    assert info["state"] == "unreadable" and info["record"] == "unreadable" and not info["pid"]


def test_requests_need_no_free_space(run):
    guest = Guest("good", run)
    guest.reserve_request()
    size = guest.paths.request.stat().st_size
    guest.set_request("stop", "kvmrun stop", "acpi")
    assert guest.paths.request.stat().st_size == size        # written in place
    assert guest.request()["stage"] == "acpi"
    guest.clear_request()
    assert guest.request() is None and guest.paths.request.exists()


def test_a_request_expires_with_its_requester(run):
    guest = Guest("good", run)
    guest.reserve_request()
    files.write_reserved(guest.paths.request, json.dumps(
        {"action": "stop", "by": "kvmrun stop", "pid": os.getpid(), "starttime": 1}))
    assert guest.request() is None                           # not that process any more


def test_overwrite_in_place_keeps_json_readable(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"a": "x" * 100}))
    files.overwrite(path, json.dumps({"a": 1}))
    assert files.read_json(path) == {"a": 1}


@pytest.mark.parametrize("request_, code, reason", [
    ({"action": "stop", "stage": "acpi"}, 8, "crashed"),       # SIGKILL from outside
    ({"action": "stop", "stage": "sigkill"}, 10, "stopped"),   # the ladder's own SIGKILL
    ({"action": "kill"}, 11, "killed"),
    ({}, 8, "crashed"),
])
def test_a_signal_death_is_classified_from_the_exit(request_, code, reason):
    ended, exit_code = classify(-9, None, False, {"by": "kvmrun stop", **request_})
    assert (ended["reason"], exit_code) == (reason, code)


@pytest.mark.parametrize("data, n, expected", [
    (b"a\nb\nc\n", 1, b"c\n"), (b"a\nb\nc", 1, b"c"), (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\n", 5, b"a\nb\n"), (b"", 3, b""), (b"a\n", 0, b""),
])
def test_tail_reads_from_the_end(data, n, expected):
    assert tail(io.BytesIO(data), n, block=2) == expected


def test_tail_of_a_big_log_reads_only_the_end():
    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size=-1):
            out = super().read(size)
            Counting.read_bytes += len(out)
            return out
    log = Counting(b"x" * 80 + b"\n" * 1 + b"y" * 50_000_000 + b"\nlast\n")
    assert tail(log, 1) == b"last\n" and Counting.read_bytes <= 65536


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_of_another_owner_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o777)
    os.chown(other, 65534, 65534)
    with pytest.raises(HostError, match="belongs to uid 65534"):
        trusted(other)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(HostError, match="not a directory"):
        trusted(link)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    trusted(mine)
    assert mine.stat().st_mode & 0o777 == 0o700


def test_unreadable_is_not_live():
    assert not State.UNREADABLE.live and State.NOT_RESPONDING.live


def test_a_supervisor_touches_only_its_own_run(run):
    """A second start's launch record (another run id) in the directory: the first
    supervisor neither writes its state nor clears the directory (bug 2)."""
    from kvmrun.guest.launch import LaunchRecord
    from kvmrun.guest.supervisor import Supervisor
    guest = Guest("good", run)
    LaunchRecord(argv=["true"], run_id="first").write(guest.paths.launch)
    sup = Supervisor(guest, None, foreground=False)
    sup.save(state="running")
    assert json.loads(guest.paths.state.read_text())["run_id"] == "first"
    LaunchRecord(argv=["true"], run_id="second").write(guest.paths.launch)
    guest.paths.qmp.write_text("")                       # the second start's socket
    before = guest.paths.state.read_text()
    sup.save(state="stopped")
    assert guest.paths.state.read_text() == before
    assert sup.owns_run() is False and guest.paths.qmp.exists()


def test_a_shutdown_cause_from_qemus_log():
    """What status reads when no supervisor saw QEMU end (bug 13): the cause QEMU traced
    (-trace qemu_system_shutdown_request), its own line for a handled signal, else none."""
    from kvmrun.guest.exits import logged_cause
    assert logged_cause(b"qemu_system_shutdown_request reason=6\n") == "guest-shutdown"
    assert logged_cause(b"qemu_system_shutdown_request reason=2\n") == "host-qmp-quit"
    assert logged_cause(b"x\nqemu_system_shutdown_request reason=8\n") == "guest-panic"
    assert logged_cause(b"qemu-system-x86_64: terminating on signal 15 from pid 9 (kill)\n") \
        == "host-signal"
    assert logged_cause(b"") is None and logged_cause(b"some warning\n") is None
    assert logged_cause(b"qemu_system_shutdown_request reason=77\n") == "cause 77"
