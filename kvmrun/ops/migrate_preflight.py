"""The target's preflight for a live migration (kvmrun.ops.migrate_target's first step):
what this host lacks to take the guest, as plain sentences, before anything is made."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from kvmrun import paths, proc
from kvmrun.errors import KvmrunError
from kvmrun.guest.rundir import Guest


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def preflight(req: dict) -> dict:
    from kvmrun.qemu import host
    problems = []
    binary = proc.which(req["binary"]) or proc.which(Path(req["binary"]).name)
    if binary is None:
        return {"problems": [f"{req['binary']} is not installed"]}
    version = host.qemu_version(binary)
    if _version(version) < _version(req["qemu_version"]):
        problems.append(f"QEMU {version} is older than the source's {req['qemu_version']}")
    if (problem := _user_problem(req.get("launch", {}).get("argv", []))):
        problems.append(problem)
    if req["machine"] not in host.qemu_machines(binary):
        problems.append(f"machine type {req['machine']} is not known to {binary} here")
    guest = Guest(req["name"])
    state = guest.read_state()
    if isinstance(state, dict) and (guest.qemu_pid(state) or guest.supervisor_pid(state)):
        problems.append(f"a guest named {req['name']} already runs here")
    from kvmrun.storage import images
    for disk in req["disks"]:
        try:
            exists = images.exists(disk["target"])
        except KvmrunError as err:
            problems.append(f"cannot look at {disk['target']} here: {err.message}")
            continue
        if disk.get("ephemeral"):
            if not exists:
                problems.append(f"{disk['target']}, the base of an ephemeral disk, is not "
                                "visible here (its overlay is copied, the base is not)")
        elif disk["copy"] and exists:
            problems.append(f"{disk['target']} already exists here (--target-dir puts the "
                            "copies elsewhere)")
        elif not disk["copy"] and not exists:
            problems.append(f"{disk['target']} is not visible here (shared storage?)")
        if disk.get("pool"):
            problems += _pool_problems(disk)
    for addr, port in req.get("ports", []):
        with socket.socket() as s:
            try:
                s.bind((addr or "0.0.0.0", port))
            except OSError as err:
                problems.append(f"port {port} (a forward) is taken here: {err.strerror}")
    missing = missing_networks(req.get("networks", []))
    if missing:
        problems.append("networks missing here: " + ", ".join(missing))
    nvram = paths.nvram_path(req["name"])
    if req.get("nvram") and nvram.exists():
        problems.append(f"{nvram} already exists here")
    tpm = paths.tpm_state_dir(req["name"])
    if req.get("source_tpm") and tpm.exists():
        problems.append(f"{tpm} (a TPM's state) already exists here")
    for helper in req["launch"].get("helpers", []):
        if not proc.which(helper["argv"][0]):
            problems.append(f"{helper['argv'][0]} (helper {helper['name']}) is not installed "
                            "here")
    return {"problems": problems, "qemu_version": version}


def _pool_problems(disk: dict) -> list[str]:
    """A shared disk that is a pool's volume: the same pool here, the volume at the same
    path (the VM defined here names the pool)."""
    from kvmrun.errors import PoolError
    from kvmrun.storage import pools
    try:
        there = pools.volume_path(disk["pool"], disk["volume"])
    except PoolError as err:
        return [f"pool {disk['pool']} (of {disk['target']}): {err.message}"]
    if there != disk["target"]:
        return [f"volume {disk['volume']} of pool {disk['pool']} is {there} here, not "
                f"{disk['target']}"]
    return []


def missing_networks(nics: list[dict]) -> list[str]:
    """The source's NICs (its network.json) whose network this host lacks, said plainly."""
    from kvmrun.net import defs, links
    from kvmrun.net.names import NAT_DEFAULT_NAME
    missing = []
    for nic in nics:
        kind, where = nic.get("type"), f"(NIC {nic.get('index')})"
        if kind == "bridge" and not os.path.exists(f"/sys/class/net/{nic.get('bridge')}"):
            missing.append(f"bridge {nic.get('bridge')} {where}")
        elif kind == "isolated" and defs.load_definition(nic.get("network", "")) is None:
            missing.append(f"isolated network {nic.get('network')} {where}")
        elif kind == "nat":
            if nic.get("network") != NAT_DEFAULT_NAME and \
                    defs.load_definition(nic.get("network", "")) is None:
                missing.append(f"NAT network {nic.get('network')} {where}")
            elif not links.is_root():
                missing.append(f"NAT network {nic.get('network')} {where} (needs root)")
    return missing


def argv_user(argv: list[str]) -> str | None:
    """The user the source's QEMU drops to (`-runas U`, `-run-with user=U`), if any: the
    target's QEMU drops to the same one. It reaches nothing by path after start-up: its
    NBD server and the incoming stream are sockets this process binds and hands over."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-runas":
            return argv[i + 1]
        if arg == "-run-with" and argv[i + 1].startswith("user="):
            return argv[i + 1].split(",")[0].removeprefix("user=")
    return None


def _user_problem(argv: list[str]) -> str | None:
    import pwd
    from kvmrun.qemu.host import DEFAULT_QEMU_USER
    user = argv_user(argv)
    if user is None or user == DEFAULT_QEMU_USER:       # made on demand (prepare)
        return None
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"the user {user!r} its QEMU runs as does not exist here"
    return None
