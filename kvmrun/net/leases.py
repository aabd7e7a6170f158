"""dnsmasq's DHCP leases of a NAT network (its lease file), for `net status` and for the
NICs `kvmrun status` shows. Standard library only."""

from __future__ import annotations

from pathlib import Path

from kvmrun.net.names import net_dir


def leases(name: str, base: Path | None = None) -> list[dict]:
    """dnsmasq's leases of NAT network `name`: mac, ip, hostname, expiry."""
    try:
        text = (net_dir(name, base) / "leases").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append({"mac": parts[1].lower(), "ip": parts[2],
                        "hostname": None if parts[3] == "*" else parts[3],
                        "expires": int(parts[0]) if parts[0].isascii() and parts[0].isdigit() else None})
    return out
