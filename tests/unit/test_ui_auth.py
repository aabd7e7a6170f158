"""`kvmrun ui`'s guards as pure functions, and the refusal of a non-loopback --listen."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmrun.ui import auth


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:8470", ("127.0.0.1", 8470)), ("8470", ("127.0.0.1", 8470)),
    ("localhost:0", ("localhost", 0)), ("[::1]:9000", ("::1", 9000)),
    ("127.1.2.3:80", ("127.1.2.3", 80))])
def test_loopback_listen_addresses(listen, expected):
    assert auth.parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["0.0.0.0:8470", "192.168.1.5:8470", "[::]:8470",
                                    "example.com:8470"])
def test_other_addresses_need_allow_remote(listen):
    with pytest.raises(auth.ListenError) as e:
        auth.parse_listen(listen)
    assert "ssh -L 8470:127.0.0.1:8470" in e.value.hint and e.value.exit_code == 2
    assert auth.parse_listen(listen, allow_remote=True)[1] == 8470


def test_bad_port():
    with pytest.raises(auth.ListenError, match="the port must be a number"):
        auth.parse_listen("127.0.0.1:http")


def test_token_host_and_origin_checks():
    token = auth.new_token()
    assert len(token) >= 32 and token != auth.new_token()
    assert auth.token_ok(token, token)
    assert not auth.token_ok(None, token) and not auth.token_ok("", token)
    assert not auth.token_ok(token[:-1], token)
    assert auth.host_ok("127.0.0.1:8470", 8470, "127.0.0.1")
    assert auth.host_ok("localhost:8470", 8470, "127.0.0.1")
    assert auth.host_ok("[::1]:8470", 8470, "::1")
    assert not auth.host_ok("evil.example:8470", 8470, "127.0.0.1")    # DNS rebinding
    assert not auth.host_ok("127.0.0.1:9999", 8470, "127.0.0.1")
    assert not auth.host_ok(None, 8470, "127.0.0.1")
    assert auth.origin_ok("http://127.0.0.1:8470", "127.0.0.1:8470")
    assert not auth.origin_ok("http://evil.example", "127.0.0.1:8470")
    assert not auth.origin_ok(None, "127.0.0.1:8470")
    assert not auth.origin_ok("null", "127.0.0.1:8470")


def test_the_cli_refuses_a_public_listen_with_a_hint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvmrun", "ui", "--listen", "0.0.0.0:8470"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "KVMRUN_RUN_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        "kvmrun: error: --listen '0.0.0.0:8470' is not a loopback address: anyone who can "
        "reach it could control your VMs")
    assert "ssh -L 8470:127.0.0.1:8470" in proc.stderr and "--allow-remote" in proc.stderr
