"""The source QEMU's side of a live migration (kvmrun.ops.migrate): the guest's disks as
QEMU has them, blockdev-mirror to the target's NBD exports until READY, and the migration
stream with its downtime limit raised step by step (up to a cap) while it does not converge.
Progress goes to `note`; failures are MigrationError (the caller rolls back)."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from kvmrun.errors import MigrationError, QMPError
from kvmrun.guest.qmp import QMPClient

STEP_WAIT = 4.0              # seconds without convergence before the limit is raised


def disks(qmp: QMPClient, launch, copy: bool, target_dir: str | None) -> list[dict]:
    """The guest's disks as QEMU has them: what is copied where. An ephemeral disk's
    throwaway overlay (in the run directory, so never shared) is always copied: the target
    makes a fresh overlay on the same base (which it must see) and only the overlay's own
    clusters are mirrored (sync "top"); its base stays where it is."""
    blocks = {b["device"]: b for b in qmp.execute("query-block") if b.get("inserted")}
    ephemeral = set(launch.ephemeral_disks)
    disks = []
    for i, path in enumerate(launch.disks):
        drive = f"drive-disk{i}"
        image = blocks.get(drive, {}).get("inserted", {})
        if i in ephemeral:
            base = image.get("image", {}).get("backing-image", {}).get("format")
            disks.append({"source": path, "target": path, "copy": True, "ephemeral": True,
                          "drive": drive, "format": "qcow2", "base_format": base or "raw",
                          "size": image.get("image", {}).get("virtual-size")})
            continue
        writable = path not in launch.shared_disks and not image.get("ro")
        moved = copy and writable
        target = os.path.join(target_dir, os.path.basename(path)) if moved and target_dir \
            else path
        disks.append({"source": path, "target": target, "copy": moved, "drive": drive,
                      "format": image.get("drv") if image.get("drv") in ("qcow2", "raw")
                      else "qcow2",
                      "size": image.get("image", {}).get("virtual-size")})
    return disks


def mirror(qmp: QMPClient, sock, exports: list[str], jobs_made: list[str],
           nodes_made: list[str], check: Callable[[], None], note: Callable[[str], None],
           top: frozenset[str] = frozenset()) -> None:
    """blockdev-mirror each drive in `exports` to its NBD export behind `sock` and wait
    until every job is READY. Each export's NBD client is a node QEMU reaches through a
    connection handed to it (getfd), never by path: QEMU may run as a user who cannot
    reach `sock`. Node names go to `nodes_made` and job ids to `jobs_made` as they are
    made (the caller removes them); the drives in `top` copy only their top image;
    `check` raises when the tunnel is gone."""
    for drive in exports:
        node, job = f"nbd-{drive}", f"mirror-{drive}"
        fd = pass_connection(qmp, sock, node)
        try:
            qmp.execute("blockdev-add", {"node-name": node, "driver": "nbd", "export": drive,
                                         "server": {"type": "fd", "str": fd}})
        except BaseException:
            _forget_fd(qmp, fd)
            raise
        nodes_made.append(node)
        qmp.execute("blockdev-mirror", {"device": drive, "job-id": job, "target": node,
                                        "sync": "top" if drive in top else "full"})
        jobs_made.append(job)
    while True:
        jobs = {j["device"]: j for j in qmp.execute("query-block-jobs")}
        missing = [j for j in jobs_made if j not in jobs]
        if missing:
            raise MigrationError(f"the disk mirror {missing[0]} stopped: "
                                 + job_error(qmp, missing[0]))
        failed = [j for j in jobs.values() if j.get("status") == "concluded"
                  or j.get("io-status", "ok") != "ok"]
        if failed:
            raise MigrationError(f"the disk mirror {failed[0]['device']} failed: "
                                 f"{failed[0].get('error', failed[0].get('io-status'))}")
        done = sum(j["offset"] for j in jobs.values())
        total = sum(j["len"] for j in jobs.values())
        note(f"disks: {done >> 20} / {total >> 20} MiB")
        if all(j.get("ready") for j in jobs.values() if j["device"] in jobs_made):
            return
        check()
        time.sleep(0.2)


def drop_nodes(qmp: QMPClient, nodes: list[str]) -> None:
    """blockdev-del the NBD client nodes of finished or cancelled mirrors (their
    connections close with them); each is forgotten once gone, or when QEMU says it has
    no such node."""
    for node in list(nodes):
        try:
            qmp.execute("blockdev-del", {"node-name": node})
        except QMPError as err:
            if "failed to find node" not in str(err).lower():
                raise MigrationError(f"cannot remove the disk mirror's node {node}: {err}")
        nodes.remove(node)


def _forget_fd(qmp: QMPClient, name: str) -> None:
    try:
        qmp.execute("closefd", {"fdname": name})
    except QMPError:
        pass                                    # consumed by QEMU already


def pass_connection(qmp: QMPClient, sock, name: str) -> str:
    """Connect to the unix socket `sock` and give QEMU the connection as fd `name`
    (QEMU reaches no path for it: it may run as a user who cannot reach `sock`)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock))
        qmp.execute("getfd", {"fdname": name}, fds=[conn.fileno()])
    except OSError as err:
        raise MigrationError(f"cannot reach the tunnel {sock}: {err}") from None
    finally:
        conn.close()
    return name


def job_error(qmp: QMPClient, job: str) -> str:
    for event in qmp.pending_events:
        data = event.get("data", {})
        if data.get("device") == job and data.get("error"):
            return data["error"]
    return "it ended early"


def stream(qmp: QMPClient, sock, downtime: int, cap: int, bandwidth: int | None,
           check: Callable[[], None], note: Callable[[str], None],
           record: Callable[..., None]) -> dict:
    """`migrate` to the unix socket `sock` until it completes; QEMU's figures of it."""
    params = {"downtime-limit": downtime}
    if bandwidth:
        params["max-bandwidth"] = bandwidth << 20
    qmp.execute("migrate-set-parameters", params)
    qmp.execute("migrate", {"uri": "fd:" + pass_connection(qmp, sock, "migrate")})
    limit, last_step, steps = downtime, time.monotonic(), [downtime]
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        ram = info.get("ram", {})
        if status == "completed":
            return {"downtime_ms": info.get("downtime"), "ram_bytes": ram.get("transferred"),
                    "setup_ms": info.get("setup-time"), "migration_ms": info.get("total-time"),
                    "downtime_limit_ms": limit, "downtime_steps_ms": steps}
        if status in ("failed", "cancelled"):
            raise MigrationError(f"the migration {status}: "
                                 f"{info.get('error-desc', 'QEMU gave no reason')}")
        note(f"RAM: {ram.get('transferred', 0) >> 20} / {ram.get('total', 0) >> 20} MiB, "
             f"{ram.get('mbps', 0):.0f} Mbit/s, expected downtime "
             f"{info.get('expected-downtime', '?')} ms (limit {limit} ms)")
        record(ram=ram.get("transferred"), limit_ms=limit, steps_ms=steps)
        if time.monotonic() - last_step > STEP_WAIT and status == "active":
            if limit >= cap:
                raise MigrationError(
                    f"the migration does not converge within a downtime of {cap} ms "
                    f"(limits tried: {', '.join(map(str, steps))} ms; expected downtime "
                    f"{info.get('expected-downtime', '?')} ms); given up, the guest runs on "
                    "here", hint="let it dirty less memory, give it more --bandwidth, or "
                                 "allow more with --max-downtime")
            limit = min(cap, limit * 2)
            qmp.execute("migrate-set-parameters", {"downtime-limit": limit})
            steps.append(limit)
            note(f"warning: not converging: downtime limit raised to {limit} ms")
            last_step = time.monotonic()
        check()
        time.sleep(0.1)


def wait_jobs_gone(qmp: QMPClient, jobs: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while any(j["device"] in jobs for j in qmp.execute("query-block-jobs")):
        if time.monotonic() > deadline:
            raise MigrationError("the disk mirrors did not finish after the switch-over")
        time.sleep(0.05)
