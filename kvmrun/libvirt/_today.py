"""The one place the libvirt converter reaches into today's modules (re-pointed by the lead
when the layers move): whether a kvmrun storage pool of a name exists, and the MAC address
kvmrun gives a NIC that names none (written out when exporting to libvirt)."""

from __future__ import annotations


def pool_exists(name: str) -> bool:
    from kvmrun import pools
    try:
        pools.get(name)
    except pools.PoolError:
        return False
    return True


def stable_mac(name: str, index: int) -> str:
    from kvmrun.compile import stable_mac as derived
    return derived(name, index)
