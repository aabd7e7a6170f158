"""More of `kvmrun migrate` between the two ssh "hosts" (tests/integration/hosts.py), with a
real NFS server (tests/integration/nfs_server.py) both hosts reach on their bridge:

- one tiny guest whose disk is a volume of an NFS pool both hosts define: Ctrl-C to a local
  `kvmrun -H hosta wait` (no TTY) ends the remote command; a preflight refusal naming the
  bridge the target lacks; a migration that cannot converge (the guest dirties memory faster
  than --bandwidth) raising its downtime limit step by step, then giving up with the guest
  untouched; then a --shared-storage migration that copies nothing but RAM;
- one UEFI guest (OVMF, TCG, no OS) with an ephemeral disk, moved live: the overlay's own
  clusters are mirrored onto a fresh overlay on the same base there, and its variable store
  arrives and is the one the target's pflash uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.integration.hosts import hosts  # noqa: F401 - the fixture
from tests.integration.nfs_server import NfsServer, why_not
from tests.integration.test_migrate import left_on, qemu_img_check, wait_for

SCRIPT = r"""
M=$(cat /proc/sys/kernel/random/boot_id)
printf 'NFS-%s' "$M" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
dd if=/dev/urandom of=/seed bs=1M count=8 2>/dev/null
( while true; do echo 3 > /proc/sys/vm/drop_caches
  D=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\000')
  echo "TICK $M $(cut -d' ' -f1 /proc/uptime) $D"; sleep 1; done ) &
( while true; do echo 3 > /proc/sys/vm/drop_caches
  if [ "$(dd if=/dev/vdb bs=5 count=1 2>/dev/null)" = DIRTY ]; then echo DIRTYING
    while [ "$(dd if=/dev/vdb bs=5 count=1 2>/dev/null)" = DIRTY ]; do
      i=0; while [ $i -lt 10 ]; do cp /seed /dirt; i=$((i+1)); done
      echo 3 > /proc/sys/vm/drop_caches; done
    echo CALM; fi
  sleep 1; done ) &
"""
TICK = re.compile(r"TICK (\S+) ([\d.]+) (\S*)")


def ticks(log: Path) -> list[tuple[str, float, str]]:
    return [(m[1], float(m[2]), m[3]) for m in TICK.finditer(log.read_text(errors="replace"))]


@pytest.fixture
def nfs_on_bridge(hosts):
    """A real NFS server on the hosts' bridge (its namespace joined to it)."""
    if why_not():
        pytest.skip(why_not())
    base = Path(tempfile.mkdtemp(prefix="nfs-", dir="/tmp"))
    server = NfsServer(base).start()
    try:
        server.address = hosts.join(server.holder_pid)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def qmp(kr, host: str, name: str, command: str, args: dict | None = None):
    extra = [json.dumps(args)] if args is not None else []
    return json.loads(kr.ok("-H", host, "qmp", name, command, *extra).out)


def hmp(kr, host: str, name: str, line: str) -> str:
    return qmp(kr, host, name, "human-monitor-command", {"command-line": line})


def remote_waits(name: str) -> list[int]:
    """PIDs of `kvmrun wait NAME` processes (the remote ones run in the hosts' sshd)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [w.decode(errors="replace") for w in argv]
            if "wait" in words and name in words and "-H" not in words and \
                    any(w.endswith("kvmrun") for w in words[:2]):
                found.append(int(entry.name))
    return found


def reads(image: Path, pattern: str) -> bool:
    """Whether `image` (open in a QEMU: read shared) reads back `pattern` ("P OFFSET LEN")."""
    done = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {pattern}", str(image)],
                          capture_output=True, text=True)
    return done.returncode == 0 and "read " in done.stdout and "fail" not in done.stdout


def control(disk: Path, word: bytes) -> None:
    with open(disk, "r+b") as f:
        f.write(word.ljust(8, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def test_nfs_shared_storage_nonconvergence_networks_and_sigint(kr, hosts, nfs_on_bridge,
                                                               tiny_guest):
    kr.env = hosts.env(kr.env)
    server = nfs_on_bridge
    for host in ("hosta", "hostb"):           # the same export, defined on both hosts
        kr.ok("-H", host, "pool", "define", "shared", "--type", "nfs", "--source",
              server.source, "--access", "userspace")
    created = json.loads(kr.ok("-H", "hosta", "disk", "create", "--pool", "shared",
                               "roam.qcow2", "-s", "64M", "--json").out)
    url = created["path"]
    assert url == f"{server.url}/roam.qcow2"
    ctl = kr.base / "control.img"
    ctl.write_bytes(bytes(1 << 20))
    bridge = f"{hosts.tag}lan"
    subprocess.run(["ip", "-n", hosts["a"].netns, "link", "add", bridge, "type", "bridge"],
                   check=True)
    subprocess.run(["ip", "-n", hosts["a"].netns, "link", "set", bridge, "up"], check=True)
    run = base64.b64encode(SCRIPT.encode()).decode()
    profile = kr.profile("roam", tiny_guest,
                         disks=[{"pool": "shared", "volume": "roam.qcow2"},
                                {"path": str(ctl), "format": "raw"}],
                         network=[{"type": "bridge", "bridge": bridge}],
                         kernel={"path": str(tiny_guest.kernel),
                                 "initrd": str(tiny_guest.initrd),
                                 "append": f"console={tiny_guest.console} quiet "
                                           f"kvmrun.run={run}"})
    kr.ok("-H", "hosta", "define", profile)
    # its QEMU drops to the kvmrun user, root's default: with --shared-storage it migrates
    # (it never reopens its images by path)
    kr.ok("-H", "hosta", "start", "roam")
    assert json.loads(kr.ok("-H", "hosta", "status", "roam", "--json").out)["qemu_user"] \
        == "kvmrun"
    a_log = hosts["a"].run_dir / "roam" / "serial.log"
    b_log = hosts["b"].run_dir / "roam" / "serial.log"
    first = wait_for(lambda: ticks(a_log), "the first TICK")[0]
    boot_id = first[0]
    wait_for(lambda: any(t[2] == f"NFS-{boot_id}" for t in ticks(a_log)),
             "the guest reading its marker back from the NFS volume")

    # Ctrl-C to a local `kvmrun -H hosta wait` without a TTY reaches the remote command
    waiting = kr.popen("-H", "hosta", "wait", "roam", "--for", "stopped")
    remote = wait_for(lambda: remote_waits("roam"), "the remote `kvmrun wait`")
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130, err.decode()
    assert err.decode().count("kvmrun: interrupted") == 1, err.decode()
    wait_for(lambda: not [p for p in remote if Path(f"/proc/{p}").exists()],
             "the remote `kvmrun wait` ending")

    # the preflight names the network host b lacks; nothing starts there
    code, _, err = kr.run("-H", "hosta", "migrate", "roam", "--to", "hostb",
                          "--shared-storage")
    assert code == 1 and f"networks missing here: bridge {bridge} (NIC 0)" in err, err
    assert left_on(hosts, "b") == []
    subprocess.run(["ip", "-n", hosts["b"].netns, "link", "add", bridge, "type", "bridge"],
                   check=True)
    subprocess.run(["ip", "-n", hosts["b"].netns, "link", "set", bridge, "up"], check=True)

    # the guest dirties memory faster than --bandwidth: the limit goes up step by step to
    # the cap, then it gives up and the guest runs on here as it was
    before = qmp(kr, "hosta", "roam", "query-migrate-parameters")
    control(ctl, b"DIRTY")
    wait_for(lambda: "DIRTYING" in a_log.read_text(errors="replace"), "the guest dirtying")
    code, _, err = kr.run("-H", "hosta", "migrate", "roam", "--to", "hostb",
                          "--shared-storage", "--bandwidth", "4", "--downtime", "50",
                          "--max-downtime", "200")
    assert code == 1, err
    assert re.findall(r"downtime limit raised to (\d+) ms", err) == ["100", "200"], err
    assert "does not converge within a downtime of 200 ms (limits tried: 50, 100, 200 ms" \
        in err, err
    assert qmp(kr, "hosta", "roam", "query-migrate")["status"] == "cancelled"
    after = qmp(kr, "hosta", "roam", "query-migrate-parameters")
    assert (after["downtime-limit"], after["max-bandwidth"]) == \
        (before["downtime-limit"], before["max-bandwidth"])
    assert qmp(kr, "hosta", "roam", "query-status")["status"] == "running"
    assert left_on(hosts, "b") == []
    taps = subprocess.run(["ip", "-n", hosts["b"].netns, "-o", "link", "show", "master",
                           bridge], capture_output=True, text=True, check=True).stdout
    assert taps == "", taps                         # the tap prepare made is gone too
    control(ctl, b"CALM")
    wait_for(lambda: "CALM" in a_log.read_text(errors="replace"), "the guest calm again")

    # --shared-storage over the NFS pool: nothing but RAM moves
    result = json.loads(kr.ok("-H", "hosta", "migrate", "roam", "--to", "hostb",
                              "--shared-storage", "--json").out)
    assert result["mode"] == "live" and result["mirrored"] == [], result
    assert result["ram_bytes"] > 0
    there = {b["device"]: b for b in qmp(kr, "hostb", "roam", "query-block")}
    assert there["drive-disk0"]["inserted"]["file"] == url
    assert there["drive-disk0"]["inserted"]["drv"] == "qcow2"
    assert not [n for n in qmp(kr, "hostb", "roam", "query-named-block-nodes")
                if n["drv"] == "nbd"]
    assert qmp(kr, "hostb", "roam", "query-block-jobs") == []
    tap = subprocess.run(["ip", "-n", hosts["b"].netns, "-o", "link", "show", "master",
                          bridge], capture_output=True, text=True, check=True).stdout
    assert tap.strip(), "the target's NIC is not on its bridge"
    last = ticks(a_log)[-1][1]
    after_move = wait_for(lambda: [t for t in ticks(b_log) if t[1] > last],
                          "a TICK on host b")
    assert after_move[0][:1] == (boot_id,) and after_move[0][2] == f"NFS-{boot_id}"
    assert b_log.read_text().count("KVMRUN-GUEST-READY") == 1        # no second boot
    defined_b = {v["name"]: v for v in json.loads(kr.ok("-H", "hostb", "defined",
                                                          "--json").out)}
    assert defined_b["roam"]["disks"] == [url, str(ctl)], defined_b
    kept = yaml.safe_load(kr.ok("-H", "hostb", "export", "roam").out)
    assert kept["disks"][0]["pool"] == "shared", kept      # the pool's, as it was defined
    kr.ok("-H", "hostb", "stop", "roam")
    qemu_img_check(server.export_dir / "roam.qcow2")


def test_uefi_guest_with_ephemeral_disk_live(kr, hosts):
    kr.env = hosts.env(kr.env)
    base = kr.base / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", str(base)], check=True,
                   capture_output=True)
    base_sum = hashlib.sha256(base.read_bytes()).hexdigest()
    profile = kr.base / "fw.yaml"
    profile.write_text(yaml.safe_dump({"name": "fw", "memory": "256M", "accel": "tcg",
                                       "firmware": "uefi", "network": [],
                                       "disks": [{"path": str(base), "ephemeral": True}]}))
    kr.ok("-H", "hosta", "define", profile)
    kr.ok("-H", "hosta", "start", "fw")
    # OVMF writes variables while it boots; once its shell waits, it writes none, so
    # the store there can be compared with the source's
    serial = hosts["a"].run_dir / "fw" / "serial.log"
    wait_for(lambda: "Shell> " in serial.read_text(errors="replace"), "the UEFI shell",
             timeout=300)
    # a write that lands in the overlay only (QEMU's own block layer, through HMP)
    hmp(kr, "hosta", "fw", 'qemu-io drive-disk0 "write -P 0x5a 1M 64k"')
    hmp(kr, "hosta", "fw", 'qemu-io drive-disk0 "flush"')
    assert reads(hosts["a"].run_dir / "fw" / "overlay-disk0.qcow2", "0x5a 1M 64k")
    a_nvram = hosts["a"].root / "data" / "nvram" / "fw_VARS.fd"
    b_nvram = hosts["b"].root / "data" / "nvram" / "fw_VARS.fd"
    assert a_nvram.exists() and not b_nvram.exists()

    result = json.loads(kr.ok("-H", "hosta", "migrate", "fw", "--to", "hostb",
                              "--keep-source-definition", "--json").out)
    assert result["mirrored"] == ["drive-disk0"], result
    overlay = hosts["b"].run_dir / "fw" / "overlay-disk0.qcow2"
    disk = {b["device"]: b for b in qmp(kr, "hostb", "fw", "query-block")}
    inserted = disk["drive-disk0"]["inserted"]
    assert inserted["file"] == str(overlay)
    assert inserted["image"]["backing-image"]["filename"] == str(base)
    hmp(kr, "hostb", "fw", 'qemu-io drive-disk0 "flush"')
    assert reads(overlay, "0x5a 1M 64k") and reads(overlay, "0x11 0 64k")
    top = [e for e in json.loads(subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(overlay)], capture_output=True,
        text=True, check=True).stdout) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in top) == 64 << 10, top    # its own clusters only
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_sum     # base untouched
    # the variable store: there, used by the target's pflash, the source's content
    flash = [b for b in disk.values() if b.get("inserted", {}).get("file") == str(b_nvram)]
    assert flash and not flash[0]["inserted"]["ro"], disk.keys()
    launch = json.loads((hosts["b"].run_dir / "fw" / "launch.json").read_text())
    assert str(b_nvram) in " ".join(launch["argv"])
    assert str(a_nvram) not in " ".join(launch["argv"])
    assert qmp(kr, "hostb", "fw", "query-status")["status"] == "running"
    source = json.loads(kr.ok("-H", "hosta", "status", "fw", "--json").out)
    assert source["state"] == "stopped"
    assert b_nvram.read_bytes() == a_nvram.read_bytes()
    template = next(p for p in ("/usr/share/OVMF/OVMF_VARS_4M.fd",
                                "/usr/share/OVMF/OVMF_VARS.fd") if os.path.exists(p))
    assert b_nvram.read_bytes() != Path(template).read_bytes()     # what OVMF wrote
    names = [v["name"] for v in json.loads(kr.ok("-H", "hostb", "defined", "--json").out)]
    assert "fw" in names        # (the module's hosts may hold the other test's VM too)
    kr.ok("-H", "hostb", "kill", "fw")
    wait_for(lambda: not overlay.exists(), "the target's overlay removed at the end")
    qemu_img_check(base)
