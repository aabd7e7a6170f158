"""Who may talk to `kvmrun ui`: pure checks, no server imports (unit-tested on their own).

- The listen address must be loopback unless the user says `--allow-remote`.
- Every request carries the access token: in the `kvmrun_token` cookie (set on the first
  visit from `?token=` in the printed URL, HttpOnly, SameSite=Strict) or `?token=`.
- The Host header must name the address the server listens on (a page on another site that
  resolves its own name to 127.0.0.1 — DNS rebinding — sends its own name and is refused).
- State-changing requests (POST) and websockets must come from the page itself: their
  `Origin` is this server's own origin.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from kvmrun.errors import ListenError

COOKIE = "kvmrun_token"
SAFE_METHODS = ("GET", "HEAD")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def parse_listen(listen: str, allow_remote: bool = False) -> tuple[str, int]:
    """`HOST:PORT`, `PORT` or `[V6]:PORT` -> (host, port); non-loopback only with
    allow_remote."""
    host, port = "127.0.0.1", listen
    if listen.startswith("["):
        host, _, port = listen[1:].partition("]:")
    elif ":" in listen:
        host, _, port = listen.rpartition(":")
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ListenError(f"--listen {listen!r}: the port must be a number 0-65535",
                          hint="e.g. --listen 127.0.0.1:8470") from None
    if not is_loopback(host) and not allow_remote:
        raise ListenError(
            f"--listen {listen!r} is not a loopback address: anyone who can reach it "
            "could control your VMs", hint=f"reach it from elsewhere through SSH instead: "
            f"ssh -L {number or 8470}:127.0.0.1:{number or 8470} THIS-HOST, or pass "
            "--allow-remote if you really mean it")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_ok(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def host_ok(host_header: str | None, port: int, listen_host: str,
            allow_remote: bool = False) -> bool:
    """The Host header names this server: a loopback name (or the listen address) with our
    port. With --allow-remote any host name is accepted (the token still guards)."""
    if not host_header:
        return False
    if allow_remote:
        return True
    name, _, their_port = host_header.rpartition(":")
    if not name or their_port != str(port):
        return False
    name = name.strip("[]")
    return name in LOOPBACK_NAMES or name == listen_host


def origin_ok(origin: str | None, host_header: str | None, scheme: str = "http") -> bool:
    """The request comes from a page this server served: Origin == scheme://Host."""
    return bool(origin and host_header) and origin == f"{scheme}://{host_header}"
