"""`kvmrun migrate` between two "hosts" (tests/integration/hosts.py: network namespaces with
their own sshd and kvmrun directories): one tiny guest goes live to host b with its disk
copied, comes back with shared storage, survives an interrupted migration and a target disk
that fills up, and is powered off where it ends; a stopped VM moves offline.

The guest writes a marker (its boot id) to its qcow2 disk at boot, then prints, every
second, "TICK <boot id> <uptime> <what the disk says>" (page cache dropped first), so its
serial log shows it did not reboot across a migration and still reads its disk."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.hosts import hosts  # noqa: F401 - the fixture

SCRIPT = r"""
M=$(cat /proc/sys/kernel/random/boot_id)
dd if=/dev/urandom of=/dev/vda bs=1M seek=1 count=8 conv=fsync 2>/dev/null
printf 'MARKER-%s' "$M" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
( while true; do echo 3 > /proc/sys/vm/drop_caches
  D=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\000')
  echo "TICK $M $(cut -d' ' -f1 /proc/uptime) $D"; sleep 1; done ) &
"""
TICK = re.compile(r"TICK (\S+) ([\d.]+) (\S*)")


def ticks(log: Path) -> list[tuple[str, float, str]]:
    return [(m[1], float(m[2]), m[3]) for m in TICK.finditer(log.read_text(errors="replace"))]


def wait_for(predicate, what: str, timeout: float = 120, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise AssertionError(f"never happened: {what}" + (f"; {log} ends:\n{tail}"
                                                                if log else ""))
        time.sleep(0.2)


def qemu_img_check(path: Path) -> None:
    done = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def web(kr, hosts, tiny_guest):
    """The guest `web`, defined and started on host a, its disk in kr.base."""
    kr.env = hosts.env(kr.env)
    disk = kr.base / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    run = base64.b64encode(SCRIPT.encode()).decode()
    profile = kr.profile("web", tiny_guest, memory="128M", disks=[{"path": str(disk)}],
                         kernel={"path": str(tiny_guest.kernel),
                                 "initrd": str(tiny_guest.initrd),
                                 "append": f"console={tiny_guest.console} quiet "
                                           f"kvmrun.run={run}"})
    kr.ok("-H", "hosta", "define", profile)
    kr.ok("-H", "hosta", "start", "web")
    log = hosts["a"].run_dir / "web" / "serial.log"
    wait_for(lambda: ticks(log), "the first TICK")
    return disk


def status(kr, host: str) -> dict:
    return json.loads(kr.ok("-H", host, "status", "web", "--json").out)


def qemu_uid_name(hosts, name: str) -> str:
    """The user the `web` QEMU on host `name` really runs as (its /proc status)."""
    import pwd
    state = json.loads((hosts[name].run_dir / "web" / "state.json").read_text())
    uid = next(line.split()[1] for line in
               Path(f"/proc/{state['qemu_pid']}/status").read_text().splitlines()
               if line.startswith("Uid:"))
    return pwd.getpwuid(int(uid)).pw_name


def nbd_nodes(kr) -> list[str]:
    """The NBD client nodes of disk mirrors on host a's `web` QEMU."""
    nodes = json.loads(kr.ok("-H", "hosta", "qmp", "web", "query-named-block-nodes").out)
    return [n["node-name"] for n in nodes if n.get("drv") == "nbd"]


def left_on(hosts, name: str, *paths: Path) -> list[str]:
    """What a failed migration left on host `name`: processes of its run directory (a
    supervisor or QEMU), sockets or a migration record there, the given files."""
    from tests.integration.conftest import _cmdline
    left = [str(p) for p in paths if p.exists()]
    run = hosts[name].run_dir
    left += [str(p) for p in (run / "web").glob("*") if p.suffix == ".sock"
             or p.name in ("migration.json", "launch.json") and not
             (run / "web" / "state.json").exists()]
    left += [str(p) for p in [run / "web" / "migration.json"] if p.exists()]
    left += [f"pid {pid}: {_cmdline(pid)[:200]}" for pid in hosts.processes()
             if f"--run-dir {run}" in _cmdline(pid) or f"{run}/" in _cmdline(pid)]
    return left


def test_live_migration_there_and_back(kr, hosts, web):
    a_log = hosts["a"].run_dir / "web" / "serial.log"
    boot_id = ticks(a_log)[0][0]
    # a running guest's disks are archived only with --live
    code, _, err = kr.run("-H", "hosta", "export", "web", "--with-disks", "-o",
                          kr.base / "web.tar")
    assert code == 4 and "is running" in err
    kr.ok("-H", "hosta", "export", "web", "--with-disks", "--live", "-o", kr.base / "web.tar")
    assert status(kr, "hosta")["state"] == "running"

    # live, disk copied, from a QEMU that dropped to the kvmrun user (root's default): it
    # reaches the NBD export through a connection handed to it, never by path
    assert status(kr, "hosta")["qemu_user"] == qemu_uid_name(hosts, "a") == "kvmrun"
    target = hosts["b"].root / "disks"
    migrating = kr.popen("-H", "hosta", "migrate", "web", "--to", "hostb", "--copy-storage",
                         "--target-dir", target, "--json")
    local = {**kr.env, "KVMRUN_RUN_DIR": str(hosts["a"].run_dir)}
    seen = []
    while migrating.poll() is None:
        info = json.loads(subprocess.run(kr.argv("status", "web", "--json"), env=local,
                                         capture_output=True, text=True).stdout or "{}")
        if info.get("migration"):   # the migration holds the monitor: status does not ask it
            seen.append((info["migration"]["to"], info["state"]))
            assert info["monitor"] == f"held by kvmrun migrate (pid {info['migration']['pid']})"
        time.sleep(0.2)
    out, err = migrating.communicate()
    assert migrating.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["mode"] == "live" and result["downtime_ms"] is not None
    # a guest under migration is not "not responding" (QEMU pauses it at the very end)
    assert seen and all(to == "hostb" and state in ("running", "paused")
                        for to, state in seen), seen
    source = status(kr, "hosta")
    assert source["state"] == "stopped" and source["ended"]["detail"] == "migrated to hostb"
    there = status(kr, "hostb")
    assert there["state"] == "running" and there["disks"][0]["file"] == str(target /
                                                                            "web.qcow2")
    assert there["qemu_user"] == qemu_uid_name(hosts, "b") == "kvmrun"   # confined there too
    assert json.loads(kr.ok("-H", "hosta", "defined", "--json").out) == []
    assert [v["name"] for v in json.loads(kr.ok("-H", "hostb", "defined", "--json").out)] \
        == ["web"]

    # the same boot, still counting, still reading its marker from the copied disk
    b_log = hosts["b"].run_dir / "web" / "serial.log"
    before = ticks(a_log)
    after = wait_for(lambda: [t for t in ticks(b_log) if t[1] > before[-1][1]],
                     "a TICK after the migration")
    assert {t[0] for t in ticks(b_log)} == {boot_id}
    assert after[0][2] == f"MARKER-{boot_id}"
    assert b_log.read_text().count("KVMRUN-GUEST-READY") == 1       # no second boot
    assert ticks(b_log)[:len(before)] == before                     # the log continues

    # back, with shared storage (host a sees host b's copy)
    kr.ok("-H", "hostb", "migrate", "web", "--to", "hosta", "--shared-storage")
    back = status(kr, "hosta")
    assert back["state"] == "running" and back["disks"][0]["file"] == str(target /
                                                                          "web.qcow2")
    assert json.loads(kr.ok("-H", "hosta", "qmp", "web", "query-status").out)["status"] \
        == "running"
    last = ticks(b_log)[-1][1]
    wait_for(lambda: [t for t in ticks(a_log) if t[1] > last], "a TICK back on host a",
             log=a_log)
    assert {t[0] for t in ticks(a_log)} == {boot_id}

    # Ctrl-C while it copies: the guest runs on here, nothing is left there
    copies = hosts["b"].root / "copies"
    slow = hosts.popen_on("a", kr.argv("migrate", "web", "--to", "hostb", "--copy-storage",
                                       "--target-dir", copies, "--bandwidth", "1"))
    wait_for(lambda: (json.loads(subprocess.run(
        kr.argv("status", "web", "--json"), env=local, capture_output=True,
        text=True).stdout).get("migration") or {}).get("status") == "migrating",
        "the slow migration to start streaming")
    slow.send_signal(signal.SIGINT)
    _, err = slow.communicate(timeout=120)
    assert slow.returncode == 130 and "kvmrun: interrupted" in err.decode(), err.decode()
    assert status(kr, "hosta")["state"] == "running"
    assert left_on(hosts, "b", copies / "web.qcow2") == [], err.decode()
    assert nbd_nodes(kr) == []                  # the mirror's NBD client is gone with it
    qemu_img_check(target / "web.qcow2")

    # the target's disk fills up mid-copy: refused cleanly, the guest runs on here
    # (mounted where host b's sshd and its sessions see it: `ip netns exec` gave them a
    # mount namespace of their own, and / is not a shared mount here)
    full = hosts["b"].root / "full"
    full.mkdir()
    on_b = hosts.in_mounts("b")
    subprocess.run([*on_b, "mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)],
                   check=True)
    try:
        code, _, err = kr.run("-H", "hosta", "migrate", "web", "--to", "hostb",
                              "--copy-storage", "--target-dir", full)
        assert code == 1 and "kvmrun: error:" in err, err
        assert "No space left on device" in err, err
        assert err.count("\n") <= 2, err
        assert subprocess.run([*on_b, "ls", "-A", str(full)], capture_output=True,
                              text=True, check=True).stdout == ""
        assert left_on(hosts, "b") == []
    finally:
        subprocess.run([*on_b, "umount", str(full)], check=True)
    info = status(kr, "hosta")
    assert info["state"] == "running" and not info["migration"]
    qemu_img_check(target / "web.qcow2")
    n = len(ticks(a_log))
    wait_for(lambda: len(ticks(a_log)) > n, "the guest still ticking on host a")

    # faults mid-stream: the target's sshd dies with the connections it served (the steps
    # share one), or the link is cut; the guest runs on here, the target cleans up itself
    for fault in ("sshd", "link"):
        copies = hosts["b"].root / f"after-{fault}"
        slow = hosts.popen_on("a", kr.argv("migrate", "web", "--to", "hostb",
                                           "--copy-storage", "--target-dir", copies,
                                           "--bandwidth", "1"))
        wait_for(lambda: (json.loads(subprocess.run(
            kr.argv("status", "web", "--json"), env=local, capture_output=True,
            text=True).stdout).get("migration") or {}).get("status") == "migrating",
            f"the migration to stream ({fault})")
        if fault == "sshd":
            hosts.kill_sshd("b", sessions=True)
        else:
            hosts.link("b", up=False)
        try:
            _, err = slow.communicate(timeout=240)
            assert slow.returncode == 1 and "kvmrun: error:" in err.decode(), err.decode()
            info = status(kr, "hosta")
            assert info["state"] == "running" and not info["migration"], (fault, info)
        finally:
            if fault == "sshd":
                hosts.restart_sshd("b")
            else:
                hosts.link("b", up=True)
        wait_for(lambda: left_on(hosts, "b", copies / "web.qcow2") == [],
                 f"host b cleaned up after the {fault} fault", timeout=90)
        qemu_img_check(target / "web.qcow2")
    n = len(ticks(a_log))
    wait_for(lambda: len(ticks(a_log)) > n, "the guest still ticking after the faults")
    assert nbd_nodes(kr) == []

    # `stop` where it ended powers it off gracefully
    stopped = kr.ok("-H", "hosta", "stop", "web").out
    assert "the guest powered off" in stopped
    assert left_on(hosts, "a") == []                # no QEMU, sockets or records left


def test_offline_migration(kr, hosts):
    kr.env = hosts.env(kr.env)
    disk = kr.base / "cold.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x42 0 1M", str(disk)], check=True,
                   capture_output=True)
    profile = kr.base / "cold.yaml"
    profile.write_text(yaml.safe_dump({"name": "cold", "memory": "64M",
                                       "disks": [{"path": str(disk)}]}))
    kr.ok("-H", "hosta", "define", profile)
    code, _, err = kr.run("-H", "hosta", "migrate", "cold", "--to", "hostb", "--live")
    assert code == 4 and "not running" in err
    target = hosts["b"].root / "cold-disks"
    kr.ok("-H", "hosta", "migrate", "cold", "--to", "hostb", "--target-dir", target)
    def names(host):
        return {v["name"]: v for v in json.loads(kr.ok("-H", host, "defined", "--json").out)}
    assert "cold" not in names("hosta")
    assert names("hostb")["cold"]["disks"] == [str(target / "cold.qcow2")]
    done = subprocess.run(["qemu-img", "compare", str(disk), str(target / "cold.qcow2")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
