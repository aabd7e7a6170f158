"""Forwarded host ports: free (checked by binding, as QEMU will), or held by which guest.
Light (standard library and the run directory): a quick start checks them too."""

from __future__ import annotations

import errno

from kvmrun.errors import HostError
from kvmrun.guest.rundir import live_launches


def check_forward(where: str, me: str, fwd: str) -> None:
    """Refuse a forward (QEMU's hostfwd form) whose host port cannot be bound, saying why
    and which running guest holds it; `where` names the profile key, `me` the guest."""
    import socket                   # here: a quick start without forwards needs none (~3 ms)
    proto, addr, rest = fwd.split(":", 2)
    port = int(rest.split("-")[0])
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        # as QEMU's own listening socket: a port only in TIME_WAIT counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr or "0.0.0.0", port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                owner = _forward_owner(me, proto, port)
                raise HostError(f"{where}: host port {addr or '*'}:{port}/{proto} is already "
                                f"in use{' by guest ' + repr(owner) if owner else ''}",
                                hint="choose another host port" + (
                                    "" if owner else f", or see what holds it: ss -"
                                    f"{'t' if proto == 'tcp' else 'u'}lnp 'sport = :{port}'")
                                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise HostError(f"{where}: {addr} is not an address of this host") from None
            if err.errno == errno.EACCES:
                raise HostError(f"{where}: host port {port} is privileged (below 1024)",
                                hint="choose a port of 1024 or more, or run as root") from None
            raise HostError(f"{where}: cannot bind {addr}:{port}/{proto}: "
                            f"{err.strerror}") from None


def _forward_owner(me: str, proto: str, port: int) -> str | None:
    """The running kvmrun guest whose forward holds this port, if any."""
    for name, launch in live_launches(skip=me):
        for fwd in launch.forwards:
            p, _, rest = fwd.split(":", 2)
            if p == proto and int(rest.split("-")[0]) == port:
                return name
    return None
