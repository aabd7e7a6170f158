"""A real Debian 12 cloud guest on the default q35 machine, booted once for several checks.

The guest (tests/guest/debian.py) is what Debian's genericcloud image ships: the cloud kernel
(no SATA AHCI), systemd, cloud-init 22.4, openssh-server, qemu-guest-agent. Its profile is what
a new user writes: a qcow2 overlay on the image (`backing:`), a cloud-init hostname and .pub key,
a forward to port 22, `devices: [agent]`, `ready: {cloud_init: true}`, `ssh: {user: debian}`,
and a virtiofs share (the cloud kernel has virtiofs but no 9p). Live snapshots freeze its
file systems; the share makes them disk-only (QEMU cannot save a vhost-user-fs's state).

The tests run in file order on one boot; `test_stop_shuts_systemd_down` stops the guest, and
the last one reverts the disk-only snapshot offline.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import KvmrunEnv
from kvmrun.net.names import stable_mac
from kvmrun.profile import CLOUD_INIT_FINISHED

NAME = "deb"
HOSTNAME = "kvmrun-deb"
SHARE_TAG = "hostshare"
BOOT_TIMEOUT = 900           # seconds for `kvmrun start` (cloud-init under TCG on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def booted(debian_guest):
    """The guest, started with `kvmrun start` (which returned when cloud-init finished);
    yields (env, log text at the moment start returned, start's result)."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-client is not installed")
    base = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    env = KvmrunEnv(base)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmrun-test",
                        "-f", str(base / "id")], check=True, stdin=subprocess.DEVNULL,
                       timeout=60)
        (base / "share").mkdir()
        (base / "share" / "from-host").write_text("written on the host\n")
        profile = base / f"{NAME}.yaml"
        profile.write_text(yaml.safe_dump({
            "name": NAME, "accel": "tcg", "memory": "1G", "smp": 2,
            "kernel": {"path": str(debian_guest.kernel), "initrd": str(debian_guest.initrd),
                       "append": debian_guest.append},
            "disks": [{"path": "root.qcow2", "backing": str(debian_guest.disk)}],
            "devices": ["rng", "agent"],
            "shares": [{"path": "share", "tag": SHARE_TAG, "type": "virtiofs"}],
            "cloud_init": {"hostname": HOSTNAME, "ssh_authorized_keys": ["id.pub"]},
            "network": [{"forward": [f"tcp:127.0.0.1:{free_port()}-:22"]}],
            "ready": {"cloud_init": True, "timeout": BOOT_TIMEOUT - 60},
            "ssh": {"user": debian_guest.user},
            "shutdown": {"timeout": 120},
        }, sort_keys=False))
        started = env.run("start", profile, timeout=BOOT_TIMEOUT)
        log = (env.guest_dir(NAME) / "serial.log").read_text(errors="replace")
        assert started.code == 0, f"start failed:\n{started}\n--- serial log\n{log[-4000:]}"
        yield env, log, started
    finally:
        env.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_start_returns_when_cloud_init_has_finished(booted):
    env, log, started = booted
    assert "ready" in started.out
    assert re.search(CLOUD_INIT_FINISHED, log), "start returned before cloud-init finished"
    # the seed was found on the virtio disk, though this kernel has no AHCI
    assert re.search(r"Datasource DataSourceNoCloud \[seed=/dev/vd[b-z]\]", log)
    assert env.status(NAME)["ready"] is True


def test_ssh_without_flags(booted):
    env, _, _ = booted
    result = env.run("ssh", NAME, "--", "hostname", timeout=180)
    assert result.code == 0, result
    assert result.out.strip() == HOSTNAME          # cloud-init's hostname and key, both


def test_hostname_resolves_for_sudo(booted):
    """The hostname shortcut sets manage_etc_hosts, so sudo does not complain."""
    env, _, _ = booted
    result = env.run("ssh", NAME, "--", "sudo", "-n", "getent", "hosts", HOSTNAME,
                     timeout=180)
    assert result.code == 0, result
    assert HOSTNAME in result.out and "unable to resolve" not in result.err


def test_ssh_as_root_is_explained(booted):
    env, _, _ = booted
    result = env.run("ssh", "-l", "root", NAME, "--", "true", timeout=180)
    assert result.code == 142, result
    assert 'Please login as the user "debian"' in result.out
    assert "the guest refuses root logins" in result.err and "ssh: {user: debian}" in result.err


def test_exec_through_the_agent(booted):
    env, _, _ = booted
    result = env.run("exec", NAME, "--", "hostname")
    assert result.code == 0 and result.out == f"{HOSTNAME}\n", result
    result = env.run("exec", NAME, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.code, result.out, result.err) == (7, "out\n", "err\n")


def test_ip_through_the_agent(booted):
    env, _, _ = booted
    rows = json.loads(env.ok("ip", NAME, "--json").out)
    mine = [r for r in rows if r["mac"] == stable_mac(NAME, 0) and r["family"] == "ipv4"]
    assert [(r["address"], r["prefix"]) for r in mine] == [("10.0.2.15", 24)], rows
    text = env.ok("ip", NAME).out
    assert re.search(rf"\S+\s+{stable_mac(NAME, 0)}\s+ipv4\s+10\.0\.2\.15/24", text), text


def test_agent_verb_and_status(booted):
    env, _, _ = booted
    info = json.loads(env.ok("agent", NAME, "guest-get-host-name").out)
    assert info == {"host-name": HOSTNAME}
    status = env.status(NAME)
    assert status["agent"] == str(env.guest_dir(NAME) / "qga.sock")
    assert f"agent    {status['agent']}" in env.ok("status", NAME).out


def test_a_silent_agent_is_exit_5_and_the_next_client_resyncs(booted):
    """qemu-guest-agent stopped inside the guest: QEMU still accepts on qga.sock, nobody
    answers; kvmrun gives up within --timeout. Started again, the next call works."""
    env, _, _ = booted
    assert env.run("ssh", NAME, "--", "sudo", "systemctl", "stop", "qemu-guest-agent",
                   timeout=180).code == 0
    result = env.run("agent", NAME, "guest-ping", "--timeout", "2", timeout=60)
    assert result.code == 5, result
    assert "did not answer guest-sync-delimited within 2s" in result.err
    assert "qemu-guest-agent" in result.err                       # the hint
    assert env.run("ssh", NAME, "--", "sudo", "systemctl", "start", "qemu-guest-agent",
                   timeout=180).code == 0
    result = env.run("exec", NAME, "--", "hostname")
    assert result.code == 0 and result.out == f"{HOSTNAME}\n", result


def test_virtiofs_share_both_ways(booted):
    """QEMU has the vhost-user-fs device with the tag on shared memory; the guest mounts it
    with the command `status` gives, reads the host's file, writes one the host reads, and
    sees a file the host writes after the mount."""
    env, _, _ = booted
    device = ["qom-get", json.dumps({"path": "/machine/peripheral/share0", "property": "%s"})]
    assert json.loads(env.ok("qmp", NAME, device[0], device[1] % "type").out) == \
        "vhost-user-fs-pci"
    assert json.loads(env.ok("qmp", NAME, device[0], device[1] % "tag").out) == SHARE_TAG
    memdevs = json.loads(env.ok("qmp", NAME, "query-memdev").out)
    assert [(m["id"], m["share"]) for m in memdevs] == [("guest-ram", True)]
    share = env.status(NAME)["shares"][0]
    assert share["mount"] == (f"mkdir -p /mnt/{SHARE_TAG} && "
                              f"mount -t virtiofs {SHARE_TAG} /mnt/{SHARE_TAG}")
    assert f"as {SHARE_TAG} (virtiofs); in the guest: {share['mount']}" in \
        env.ok("status", NAME).out
    mnt = f"/mnt/{SHARE_TAG}"
    result = env.run("ssh", NAME, "--", "sudo", "sh", "-c", f"'{share['mount']} && "
                     f"cat {mnt}/from-host && echo written in the guest > {mnt}/from-guest'",
                     timeout=180)
    assert result.code == 0, result
    assert result.out == "written on the host\n"
    host_side = env.base / "share"
    assert (host_side / "from-guest").read_text() == "written in the guest\n"
    (host_side / "later").write_text("after the mount\n")
    result = env.run("ssh", NAME, "--", "cat", f"{mnt}/later", timeout=180)
    assert (result.code, result.out) == (0, "after the mount\n"), result
def test_a_live_snapshot_freezes_and_thaws_the_file_systems(booted):
    """The virtiofs share makes savevm impossible: a snapshot with RAM state is refused with
    a hint (the file systems thawed after it all the same). --disk-only takes the disks'
    snapshots between guest-fsfreeze-freeze and -thaw; afterwards the guest writes again.
    Such a snapshot has no RAM state: a live revert is refused (stop first). With the agent
    stopped, the snapshot is taken crash-consistent, with a note, in bounded time."""
    env, _, _ = booted
    refused = env.run("snapshot", "create", NAME, "withram", "--json", timeout=600)
    assert refused.code == 6, refused
    assert ("this guest has a device whose state cannot be saved (virtiofs share "
            f"{SHARE_TAG}; QEMU device ") in refused.err, refused
    assert f"kvmrun snapshot create {NAME} withram --disk-only" in refused.err, refused
    assert json.loads(env.ok("agent", NAME, "guest-fsfreeze-status").out) == "thawed"
    assert json.loads(env.ok("snapshot", "list", NAME, "--json").out) == []

    made = json.loads(env.ok("snapshot", "create", NAME, "quiesced", "--disk-only", "--json",
                             timeout=600).out)
    assert (made["live"], made["disk_only"], made["frozen"], made["note"]) == \
        (True, True, True, None), made
    assert [(r["name"], r["vm_state_size"]) for r in made["snapshots"]] == [("quiesced", 0)]
    assert json.loads(env.ok("agent", NAME, "guest-fsfreeze-status").out) == "thawed"
    wrote = env.run("exec", NAME, "--", "sh", "-c", "echo after > /var/tmp/w && sync && "
                                                     "cat /var/tmp/w")
    assert (wrote.code, wrote.out) == (0, "after\n"), wrote

    live_revert = env.run("snapshot", "revert", NAME, "quiesced", timeout=600)
    assert live_revert.code == 4, live_revert
    assert "quiesced is a disk-only snapshot (no RAM state): it cannot be reverted while " \
        f"{NAME} runs" in live_revert.err and f"kvmrun stop {NAME}" in live_revert.err

    assert env.run("ssh", NAME, "--", "sudo", "systemctl", "stop", "qemu-guest-agent",
                   timeout=180).code == 0
    silent = env.run("snapshot", "create", NAME, "unfrozen", "--disk-only", "--json",
                     timeout=600)
    assert silent.code == 0, silent
    result = json.loads(silent.out)
    assert result["frozen"] is False and "crash-consistent" in result["note"], result
    assert silent.err.count("\n") == 1 and silent.err.startswith("kvmrun: note: the guest "
                                                                   "agent did not freeze")
    assert env.run("ssh", NAME, "--", "sudo", "systemctl", "start", "qemu-guest-agent",
                   timeout=180).code == 0
    env.ok("snapshot", "delete", NAME, "unfrozen", timeout=600)   # "quiesced" stays
    assert [r["name"] for r in json.loads(env.ok("snapshot", "list", NAME, "--json").out)] \
        == ["quiesced"]


def test_stop_shuts_systemd_down(booted):
    env, _, _ = booted
    result = env.run("stop", NAME, timeout=300)
    assert result.code == 0, result
    assert "the guest powered off" in result.out
    env.wait_state(NAME, lambda info: info["state"] == "stopped")
    log = (env.guest_dir(NAME) / "serial.log").read_text(errors="replace")
    tail = log[log.rindex("Cloud-init v."):]
    assert re.search(r"Reached target .*poweroff\.target", _plain(tail)), _plain(tail)[-3000:]
    assert "systemd-shutdown[1]: Unmounting file systems." in tail
    assert "reboot: Power down" in tail
    assert env.our_processes() == {}


def _plain(text: str) -> str:
    """The console without its colour escapes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_an_offline_revert_of_a_disk_only_snapshot_boots_from_the_disks(booted):
    """After the stop: "quiesced" (disk-only, above) reverts its disks with qemu-img and
    arranges no RAM state for the next start. (Resuming from RAM state is covered with the
    tiny guest in test_snapshot_resume.py; this guest cannot have RAM snapshots.)"""
    env, _, _ = booted
    reverted = json.loads(env.ok("snapshot", "revert", NAME, "quiesced", "--json",
                                 timeout=600).out)
    assert (reverted["live"], reverted["resume"], reverted["note"]) == (False, False, None)
    assert not (env.base / "data" / "resume" / f"{NAME}.json").exists()
