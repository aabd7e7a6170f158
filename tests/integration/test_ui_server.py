"""`kvmrun ui` without a browser: the unix-socket mode, and a stop that ends the server
(SIGTERM) while an event stream is open."""

from __future__ import annotations

import http.client
import json
import signal
import socket

import pytest

pytest.importorskip("aiohttp")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def _get(path: str, url: str, headers: dict | None = None) -> tuple[int, str]:
    conn = UnixHTTP(path)
    conn.request("GET", url, headers={"Host": "localhost:8470", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, body


def test_unix_socket_mode_needs_the_token_too(kr):
    sock = kr.base / "ui.sock"
    proc = kr.popen("ui", "--socket", str(sock), "--token", "s3cret-token-for-this-test",
                    "--exit-after", "120")
    line = proc.stdout.readline().decode()
    assert "?token=s3cret-token-for-this-test" in line and str(sock) in line
    assert _get(str(sock), "/api/guests")[0] == 403
    status, body = _get(str(sock), "/api/guests",
                        {"Cookie": "kvmrun_token=s3cret-token-for-this-test"})
    assert status == 200 and json.loads(body) == {"ok": True, "result": []}
    status, _ = _get(str(sock), "/?token=s3cret-token-for-this-test")
    assert status == 302                       # the token becomes a cookie
    # SIGTERM ends it promptly even with an event stream open
    stream = UnixHTTP(str(sock))
    stream.request("GET", "/api/events", headers={
        "Host": "localhost:8470", "Cookie": "kvmrun_token=s3cret-token-for-this-test"})
    resp = stream.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"event: guests")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not sock.exists()
