"""What a guest is doing: `status` (state, resources, disks, NICs, how it ended) and
`list`. Reads the run directory, and QMP for a running guest's live details; loads no
profile machinery (no yaml), so both stay quick.
"""

from __future__ import annotations

import time

from kvmrun.errors import GuestError, QMPError
from kvmrun.guest import agent, cgroup, netrecord
from kvmrun.guest.qmp import QMPClient
from kvmrun.guest.rundir import Guest, State, guest_names
from kvmrun.net.leases import leases
from kvmrun.files import read_json
from kvmrun.proc import identified, usage, wait_pid

EXIT_GRACE = 0.5     # seconds a QEMU whose monitor failed gets to show that it is exiting


def status(guest: Guest, detailed: bool = True) -> dict:
    state_name, state = guest.live_state()
    if not state:
        raise GuestError(f"no guest named {guest.name!r} in {guest.paths.dir.parent}",
                         hint="see `kvmrun list --all`")
    summary = state.get("summary") if isinstance(state.get("summary"), dict) else {}
    pid = guest.qemu_pid(state)
    supervisor = guest.supervisor_pid(state)
    info = {
        "name": guest.name, "state": state_name, "pid": pid,
        "uptime": _uptime(state) if pid else None,
        "arch": summary.get("arch"), "machine": summary.get("machine"),
        "accel": summary.get("accel"), "vcpus": summary.get("smp"),
        "memory_mib": summary.get("memory"), "forwards": summary.get("forwards", []),
        "shutdown_method": summary.get("shutdown_method"), "ready": state.get("ready"),
        "sandbox": summary.get("sandbox"), "qemu_user": summary.get("qemu_user"),
        "firmware": summary.get("firmware"), "secure_boot": summary.get("secure_boot"),
        "qemu_user_why": summary.get("qemu_user_why"),
        "limits": summary.get("limits") or {},
        "cgroup": cgroup.of_pid(pid) if pid and summary.get("limits") else None,
        "profile": summary.get("source"),
        "console": str(guest.paths.console), "serial_log": str(guest.paths.serial_log),
        "qmp": str(guest.paths.qmp_cli), "run_dir": str(guest.paths.dir),
        "supervisor_pid": supervisor,
        # a guest whose supervisor died still runs, but nobody records its events or end
        "supervisor": None if not pid else "running" if supervisor else "dead",
        "ended": None if pid else state.get("ended"),
    }
    if state.get("record") in ("unreadable", "missing"):
        info["record"] = state["record"]
        info["problem"] = (f"{guest.paths.state} is {state['record']}"
                           + ("; QEMU still holds the guest's pidfile" if pid else ""))
    launch = guest.launch_or_none()
    info["ephemeral_disks"] = launch.ephemeral_disks if launch else []
    info["agent"] = str(guest.paths.qga) if launch and agent.has_port(launch.argv) else None
    info["nics"] = nic_status(guest)
    info["shares"] = [{**s, "type": s.get("type", "9p"),
                       "mount": share_mount_command(s["tag"], s["readonly"],
                                                    s.get("type", "9p"))}
                      for s in (launch.shares if launch else [])]
    info["tpm"] = tpm_status(guest, launch)
    info["helpers"] = [{k: h.get(k) for k in ("name", "pid", "socket", "log")}
                       for h in (state.get("helpers") or [])] if pid else []
    info["migration"] = migration(guest) if pid else None
    if pid and detailed and state_name is State.NOT_RESPONDING:
        info["problem"] = "QEMU is stopped by a signal (SIGSTOP or a debugger): it cannot " \
                          "answer its monitor"
        info.update(usage(pid))
    elif pid and detailed and (holder := monitor_holder(guest, info["migration"])):
        # `kvmrun migrate` (to the end), `export --live` (while it copies) hold the monitor
        # (QEMU's QMP socket takes one client at a time): asking it would fail and call a
        # guest that runs "not responding"
        info["monitor"] = f"held by {holder}"
        info.update(usage(pid))
    elif pid and detailed:
        live = _live_details(guest, pid)
        if live.get("state") is State.NOT_RESPONDING and wait_pid(pid, EXIT_GRACE):
            return status(guest, detailed)     # it was exiting (its monitor closes first):
        info.update(live)                      # say how it ended, not "not responding"
    return info


def _uptime(state: dict) -> float | None:
    started = state.get("started_at")
    return round(time.time() - started, 1) if isinstance(started, (int, float)) else None


def migration(guest: Guest) -> dict | None:
    """The migration under way from this guest (kvmrun.ops.migrate's record, while the
    `kvmrun migrate` that wrote it lives), or None."""
    record = read_json(guest.paths.migration)
    if not isinstance(record, dict) or record.get("role") != "source":
        return None
    if not identified(record.get("pid"), record.get("starttime")):
        return None
    return {"to": record.get("to"), "status": record.get("status"),
            "ram_bytes": record.get("ram"), "pid": record.get("pid")}


def monitor_holder(guest: Guest, migration: dict | None) -> str | None:
    """Which command holds the guest's monitor now ("kvmrun migrate (pid N)"), or None:
    the migration under way, or monitor.json's command while it lives."""
    if migration:
        return f"kvmrun migrate (pid {migration['pid']})"
    record = read_json(guest.paths.monitor_hold)
    if isinstance(record, dict) and identified(record.get("pid"), record.get("starttime")):
        return f"{record.get('by')} (pid {record['pid']})"
    return None


def share_mount_command(tag: str, readonly: bool = False, type: str = "9p") -> str:
    """What a Linux guest runs to mount a share: virtio-9p (the 9p and 9pnet_virtio
    modules), or virtiofs (the virtiofs module; Debian's cloud kernel has only this one)."""
    if type == "virtiofs":
        return f"mkdir -p /mnt/{tag} && mount -t virtiofs {tag} /mnt/{tag}"
    ro = ",ro" if readonly else ""
    return (f"mkdir -p /mnt/{tag} && mount -t 9p -o trans=virtio,version=9p2000.L{ro} "
            f"{tag} /mnt/{tag}")


def tpm_status(guest: Guest, launch) -> dict | None:
    """The guest's TPM (a swtpm helper) and where its state is kept, or None."""
    if not launch or not any(h.get("name") == "swtpm" for h in launch.helpers):
        return None
    return {"version": "2.0", "state_dir": str(guest.paths.tpm),
            "log": str(guest.paths.helper_log("swtpm"))}


def _device_id(block: dict) -> str:
    """The guest device's id from query-block: '/machine/peripheral/disk0/virtio-backend'
    -> 'disk0'; a drive without a device keeps its drive id."""
    qdev = block.get("qdev") or ""
    parts = qdev.split("/")
    if "peripheral" in parts and parts.index("peripheral") + 1 < len(parts):
        return parts[parts.index("peripheral") + 1]
    return qdev if qdev and "/" not in qdev else block["device"]


def _live_details(guest: Guest, pid: int) -> dict:
    details: dict = {}
    try:
        with QMPClient(guest.paths.qmp_cli, timeout=2) as client:
            status = client.execute("query-status")
            if status.get("status") == "paused" or not status.get("running"):
                details["state"] = State.PAUSED
            details["qemu_status"] = status.get("status")
            details["vcpus"] = len(client.execute("query-cpus-fast"))
            details["memory_mib"] = client.execute(
                "query-memory-size-summary")["base-memory"] // (1024 * 1024)
            details["disks"] = [
                {"device": _device_id(b),
                 "file": b.get("inserted", {}).get("file"),
                 "format": b.get("inserted", {}).get("drv"),
                 "readonly": b.get("inserted", {}).get("ro"),
                 "removable": b.get("removable"),
                 "io_status": b.get("io-status")}
                for b in client.execute("query-block") if b.get("inserted")]
            details["paused_reason"] = paused_reason(status, details["disks"])
    except (QMPError, GuestError) as err:   # a hung QEMU: bounded by the 2 s timeout
        details["qmp_error"] = str(err)
        details["state"] = State.NOT_RESPONDING
    details.update(usage(pid))
    return details


def paused_reason(status: dict, disks: list[dict]) -> str | None:
    """Why QEMU stopped the guest by itself: an I/O error on a disk whose werror/rerror is
    stop (QMP status io-error; the disk's io-status failed or nospace), and what to do."""
    if status.get("status") != "io-error":
        return None
    failed = [d for d in disks if d.get("io_status") in ("failed", "nospace")]
    where = "; ".join(f"{d['device']} ({d['file']}): "
                      + ("no space left" if d["io_status"] == "nospace" else "I/O error")
                      for d in failed) or "a disk"
    return (f"paused by QEMU after an I/O error on {where}; fix the storage (is the "
            "server back?), then `kvmrun resume` retries the failed request")


def list_guests(include_ended: bool = True) -> list[dict]:
    rows = []
    for name in guest_names():
        guest = Guest(name)
        state_name, state = guest.live_state()      # one bad record spoils only its row
        if not include_ended and not state_name.live:
            continue
        summary = state.get("summary") if isinstance(state.get("summary"), dict) else {}
        pid = guest.qemu_pid(state)
        ended = state.get("ended") if isinstance(state.get("ended"), dict) else {}
        rows.append({"name": name, "state": state_name, "pid": pid,
                     "memory_mib": summary.get("memory"), "vcpus": summary.get("smp"),
                     "uptime": _uptime(state) if pid else None,
                     "ended": None if pid else ended.get("reason"),
                     "unit": state.get("unit")})
    return rows




def nic_status(guest: Guest) -> list[dict]:
    """The guest's NICs from its network record, with, for NAT networks, the DHCP lease of
    each MAC (read from the network's lease file: no kvmrun.net import for status)."""
    nics = netrecord.read(guest.paths).get("nics", [])
    for nic in nics:
        if nic.get("type") == "nat":
            lease = next((entry for entry in leases(nic.get("network", ""), guest.paths.dir.parent)
                          if entry["mac"] == nic.get("mac")), None)
            if lease:
                nic["lease"] = lease
    return nics
