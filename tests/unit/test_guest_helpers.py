"""kvmrun.guest.helpers with real processes: a helper is up once it listens on its socket
(seen in /proc/net/unix, never by connecting), a helper that exits or never listens is a
HelperFailed naming it and its log, and every helper is ended on exit, whatever happened."""

from __future__ import annotations

import sys
import textwrap

import pytest

from kvmrun import proc
from kvmrun.guest.helpers import Helper, HelperFailed, end_recorded, listening

LISTEN = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    print("bound", flush=True)
    time.sleep(float(sys.argv[2]))        # bound, not yet listening
    s.listen()
    print("listening", flush=True)
    time.sleep(600)
""")


def python(*args: str) -> list[str]:
    return [sys.executable, "-c", *args]


def test_up_once_listening_and_ended_on_exit(tmp_path):
    sock = tmp_path / "h.sock"
    helper = Helper("demo", python(LISTEN, str(sock), "0.3"), str(sock), tmp_path / "h.log")
    with helper:
        assert listening(sock)
        assert "listening" in helper.output()         # a bound socket alone did not count
        record = helper.record()
        assert record["name"] == "demo" and proc.identified(record["pid"],
                                                             record["starttime"])
    assert helper.proc.returncode is not None         # ended (SIGTERM) and reaped
    assert not sock.exists()


def test_a_helper_that_exits_names_itself_and_its_log(tmp_path):
    log = tmp_path / "h.log"
    with pytest.raises(HelperFailed) as failed:
        with Helper("fs0", python("print('source is not a directory'); raise SystemExit(3)"),
                    str(tmp_path / "h.sock"), log):
            pass
    name = sys.executable.rsplit("/", 1)[1]
    assert str(failed.value) == (f"helper fs0 ({name}) exited with status 3 while starting; "
                                 f"its log: {log}")
    assert failed.value.output == "source is not a directory"
    assert failed.value.argv[0] == sys.executable


def test_a_helper_that_never_listens_is_ended_after_its_wait(tmp_path):
    sock = tmp_path / "h.sock"
    helper = Helper("slow", python(LISTEN, str(sock), "600"), str(sock), tmp_path / "h.log",
                    wait=0.5)
    with pytest.raises(HelperFailed, match=rf"helper slow \(.*\) did not listen on {sock} "
                                           r"within 0.5s; its log: "):
        helper.__enter__()
    assert helper.proc.returncode is not None         # not left running


def test_a_missing_program(tmp_path):
    with pytest.raises(HelperFailed, match=r"cannot run helper x \(no-such-helper\): No such "
                                           r"file or directory"):
        Helper("x", [str(tmp_path / "no-such-helper")], str(tmp_path / "s"),
               tmp_path / "x.log").__enter__()


def test_end_recorded_ends_only_the_very_process(tmp_path):
    sock = tmp_path / "h.sock"
    with Helper("demo", python(LISTEN, str(sock), "0"), str(sock), tmp_path / "h.log") as h:
        stale = {**h.record(), "starttime": h.record()["starttime"] + 1}
        end_recorded([stale, {"name": "junk"}, "junk"])          # not it: left alone
        assert h.proc.poll() is None
        end_recorded([h.record()])
        assert h.proc.wait(10) is not None
