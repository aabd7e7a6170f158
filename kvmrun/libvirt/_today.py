"""The one place the libvirt converter reaches into today's modules (re-pointed by the lead
when the layers move): whether a kvmrun storage pool of a name exists."""

from __future__ import annotations


def pool_exists(name: str) -> bool:
    from kvmrun import pools
    try:
        pools.get(name)
    except pools.PoolError:
        return False
    return True
