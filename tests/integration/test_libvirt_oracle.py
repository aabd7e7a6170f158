"""QEMU is the oracle of the libvirt import: every corpus domain that imports is converted,
compiled for TCG, started paused by real QEMU, and QMP must report what libvirt's own
`.args` file (libvirt's expected command line for the same XML) asks for: memory, vCPUs,
machine type, disks (bus, format, read-only, media), NICs (model, MAC) and boot order.

The expected argv is parsed as data (-m, -smp, -machine, -blockdev/-device JSON, -drive,
-net), never compared as strings. Disk, ISO and kernel paths of the corpus do not exist
here: each is re-pointed to a placeholder in the test's scratch directory (so QEMU opens a
real image of the declared format), and the comparison maps libvirt's path to it. Where the
conversion lost something (a floppy, an NBD disk, an SD slot), the test requires the loss to
be listed at that device's XML path instead of a match. `cpu: host` (host-passthrough) is
left to kvmrun's TCG default, since TCG has no host CPU; the CPU model is not among the
compared facts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import qemu_oracle as oracle
from kvmrun import arch as archmod
from kvmrun import records
from kvmrun.storage import disks as storage
from kvmrun.qemu.compile import build
from kvmrun.errors import ProfileError
from kvmrun.libvirt.domain import convert, machine_family

pytestmark = pytest.mark.qemu

CORPUS = Path(os.environ.get("KVMRUN_LIBVIRT_CORPUS")
              or Path(__file__).resolve().parents[3] / "shared" / "libvirt-domains")
FILES = sorted(CORPUS.glob("*.xml"))
DISK_DRIVERS = ("virtio-blk", "ide-hd", "ide-cd", "scsi-hd", "scsi-cd", "floppy",
                "usb-storage", "sd-card", "nvme")


# ---------------------------------------------------------------- libvirt's argv, as data

def expected_argv(xml: Path) -> list[str]:
    args = next(xml.parent.glob(xml.stem + ".*-latest.args"))
    words = shlex.split(args.read_text().replace("\\\n", " "))
    return [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]


def _options(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def _kv(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) if "=" in p else (p, "") for p in text.split(","))


@dataclasses.dataclass
class Expected:
    memory: int
    cpus: int
    machine: str
    disks: list[dict]            # driver, file, format, ro, bootindex
    nics: dict[str, str]         # mac -> model
    boot: list[tuple[str, str]]  # ("disk"/"nic", file or mac), in boot order
    uefi: bool                   # firmware code on pflash0
    secure: bool                 # Secure Boot: SMM on, pflash writable from SMM only


def expected(argv: list[str]) -> Expected:
    mem = _options(argv, "-m")[0]
    size = re.fullmatch(r"size=(\d+)k", mem)
    memory = int(size.group(1)) * 1024 if size else int(mem) * oracle.MiB
    cpus = int(_options(argv, "-smp")[0].split(",")[0])
    machine, *machine_opts = _options(argv, "-machine")[0].split(",")
    uefi = any(o.startswith("pflash0=") for o in machine_opts)
    secure = "smm=on" in machine_opts and \
        "driver=cfi.pflash01,property=secure,value=on" in _options(argv, "-global")
    nodes = {}
    for text in _options(argv, "-blockdev"):
        node = json.loads(text)
        nodes[node["node-name"]] = node
    disks, nics, boot = [], {}, []
    for text in _options(argv, "-device"):
        if not text.startswith("{"):
            continue
        dev = json.loads(text)
        if "drive" in dev and dev["driver"].startswith(DISK_DRIVERS):
            top = nodes[dev["drive"]]
            storage_node = nodes.get(top.get("file"), top)
            fmt = top["driver"] if "file" in top and isinstance(top["file"], str) else "raw"
            disks.append({"driver": dev["driver"], "file": storage_node.get("filename"),
                          "format": fmt, "ro": bool(top.get("read-only", False))})
            if "bootindex" in dev:
                boot.append((dev["bootindex"], "disk", storage_node.get("filename")))
        elif "netdev" in dev:
            nics[dev["mac"]] = dev["driver"]
            if "bootindex" in dev:
                boot.append((dev["bootindex"], "nic", dev["mac"]))
    for text in _options(argv, "-drive"):                # the old form: vexpress's SD card
        opts = _kv(text)
        disks.append({"driver": "sd-card" if opts.get("if") == "sd" else opts.get("if"),
                      "file": opts.get("file"), "format": opts.get("format", "raw"),
                      "ro": opts.get("readonly") == "on"})
    for text in _options(argv, "-net"):
        opts = _kv(text)
        if "nic" in opts:
            nics[opts["macaddr"]] = opts["model"]
    return Expected(memory, cpus, machine, disks, nics,
                    [(kind, key) for _, kind, key in sorted(boot)], uefi, secure)


# ---------------------------------------------------------------- the import, made runnable

def placeholders(profile, workdir: Path):
    """The profile with every file re-pointed into workdir; returns it and {old: new}."""
    files, moved = workdir / "files", {}

    def move(path: str | None) -> str | None:
        if path is None:
            return None
        moved.setdefault(path, str(files / f"{len(moved)}-{Path(path).name.replace(' ', '_')}"))
        return moved[path]

    disks = tuple(records.replace(d, path=move(d.path), backing=move(d.backing))
                  for d in profile.disks)
    kernel = profile.kernel and records.replace(
        profile.kernel, path=move(profile.kernel.path), initrd=move(profile.kernel.initrd),
        dtb=move(profile.kernel.dtb))
    shares = tuple(records.replace(s, path=move(s.path)) for s in profile.shares)
    cpu = None if (profile.cpu or "").split(",")[0] == "host" else profile.cpu
    out = records.replace(profile, disks=disks, cdrom=move(profile.cdrom), kernel=kernel,
                              shares=shares, cpu=cpu)
    oracle.make_files(out, workdir)
    return out, moved


def xml_paths(xml: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(libvirt file -> XML paths of the <disk>s that name it, in order; MAC -> XML path of
    its <interface>) -- the corpus is trusted test data."""
    disks: dict[str, list[str]] = {}
    root = ET.parse(xml).getroot()
    for i, disk in enumerate(root.iter("disk")):
        source = disk.find("source")
        if source is not None:
            disks.setdefault(source.get("file") or source.get("dev"), []).append(
                f"devices/disk[{i}]")
    nics = {}
    for i, iface in enumerate(root.iter("interface")):
        mac = iface.find("mac")
        if mac is not None:
            nics[mac.get("address")] = f"devices/interface[{i}]"
    return disks, nics


def imported(xml: Path):
    try:
        conv = convert(xml.read_bytes(), xml.name, path_exists=lambda p: True,
                       pool_exists=lambda p: False)
        return conv, conv.profile()
    except ProfileError:
        return None, None


CASES = [f for f in FILES if imported(f)[0] is not None]
# QEMU 7.2 (Debian 12) refuses these exactly as it refuses libvirt's own command line for them
QEMU_REFUSES = {"armv7l-versatilepb-minimal.xml": "versatilepb: memory size must not exceed "
                                                  "256MB"}


@pytest.mark.skipif(not FILES, reason=f"no libvirt corpus at {CORPUS}")
def test_the_corpus_is_there_and_mostly_imports():
    assert len(FILES) >= 30 and len(CASES) >= len(FILES) - 2


@pytest.mark.parametrize("xml", CASES, ids=lambda p: p.stem)
def test_qemu_builds_what_libvirt_asks(xml, tmp_path, monkeypatch):
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")
    conv, profile = imported(xml)
    binary = archmod.get(profile.arch).qemu
    if not shutil.which(binary):
        pytest.skip(f"{binary} is not installed")
    want = expected(expected_argv(xml))
    profile, moved = placeholders(profile, tmp_path)
    profile = oracle.with_free_ports(storage.with_formats(profile))
    paths = oracle.run_paths(tmp_path)
    oracle.make_nvram(profile, paths)
    compiled = build(profile, oracle.TCG_HOST, paths)
    lost = {f.path for f in conv.losses}
    disk_at, nic_at = xml_paths(xml)

    def at(where: str) -> bool:
        return any(p == where or p.startswith(where + "/") for p in lost)

    def is_lost(libvirt_file: str, n: int = 0) -> bool:
        """Whether the conversion lists a loss at the n-th <disk> naming this file."""
        places = disk_at.get(libvirt_file, ["?"])
        return at(places[min(n, len(places) - 1)])

    if xml.name in QEMU_REFUSES:          # libvirt's own argv asks for it too (see -m)
        with pytest.raises(oracle.QemuRefused, match=QEMU_REFUSES[xml.name]):
            with oracle.launch_compiled(profile, compiled, paths, tmp_path):
                pass
        assert _options(expected_argv(xml), "-m") == [f"size={profile.memory * 1024}k"]
        return
    with oracle.launch_compiled(profile, compiled, paths, tmp_path) as qmp:
        assert qmp.cmd("query-memory-size-summary")["base-memory"] == want.memory, "memory"
        assert len(qmp.cmd("query-cpus-fast")) == want.cpus, "vCPUs"
        known = {n for m in qmp.cmd("query-machines") for n in (m["name"], m.get("alias"))}
        asked = want.machine if want.machine in known else machine_family(want.machine)
        expected_type, built = oracle.machine_type(qmp, asked)
        assert built == expected_type, "machine type"
        _check_disks(qmp, want, moved, is_lost)
        _check_nics(qmp, want, lambda mac: at(nic_at.get(mac, "?")))
        _check_boot(qmp, want, moved, is_lost)
        block = {b["device"]: b for b in qmp.cmd("query-block")}
        assert ("pflash0" in block) == want.uefi, "UEFI firmware on pflash0"
        if want.uefi:
            assert block["pflash0"]["inserted"]["ro"] is True
        if want.uefi and archmod.get(profile.arch).smm:
            assert qmp.cmd("qom-get", path="/machine/system.flash0",
                           property="secure") is want.secure, "Secure Boot's secure pflash"
        if want.secure:
            assert qmp.cmd("qom-get", path="/machine", property="smm") == "on", "SMM"


def _qemu_disks(qmp) -> dict[str, dict]:
    """file -> what QEMU built: device type, format, read-only, removable (media)."""
    out = {}
    for b in qmp.cmd("query-block"):
        if "inserted" not in b or not b.get("qdev") or b["device"].startswith("pflash"):
            continue
        qdev = b["qdev"]
        path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
        kind = qmp.cmd("qom-get", path=path.removesuffix("/virtio-backend"), property="type")
        out[b["inserted"]["file"]] = {"driver": kind, "format": b["inserted"]["drv"],
                                      "ro": b["inserted"]["ro"], "removable": b["removable"]}
    return out


def _family(driver: str) -> str:
    return "virtio-blk" if driver.startswith("virtio-blk") else driver


def _check_disks(qmp, want: Expected, moved: dict, is_lost) -> None:
    built = _qemu_disks(qmp)
    matched, seen = set(), {}
    for disk in want.disks:
        if disk["file"] is None:
            continue                             # an empty drive (listed as a loss)
        n = seen[disk["file"]] = seen.get(disk["file"], -1) + 1
        here = moved.get(disk["file"])
        if here is None or here in matched:
            assert is_lost(disk["file"], n), f"{disk['file']} was dropped without a loss"
            continue
        matched.add(here)
        got = built[here]
        if _family(got["driver"]) != _family(disk["driver"]):
            assert is_lost(disk["file"], n), (f"{disk['file']}: QEMU built {got['driver']}, "
                                              f"libvirt asks for {disk['driver']}, no loss")
        assert got["format"] == disk["format"], f"{disk['file']} format"
        assert got["ro"] == disk["ro"], f"{disk['file']} read-only"
        assert got["removable"] == disk["driver"].endswith("-cd"), f"{disk['file']} media"
    assert set(built) <= matched | {p for p in built if "/run/" in p}, "disks nobody asked for"


def _check_nics(qmp, want: Expected, is_lost) -> None:
    network = qmp.cmd("human-monitor-command", **{"command-line": "info network"})
    got = {mac: model for model, mac in re.findall(r"type=nic,model=([^,]+),macaddr=(\S+)",
                                                   network)}
    for mac in set(want.nics) - set(got):
        assert is_lost(mac), f"NIC {mac} was dropped without a loss"
    assert got == {m: model for m, model in want.nics.items() if m in got}, "NIC models"


def _check_boot(qmp, want: Expected, moved: dict, is_lost) -> None:
    peripherals = {p["name"] for p in qmp.cmd("qom-list", path="/machine/peripheral")}
    order = []
    block = {b.get("qdev"): b for b in qmp.cmd("query-block")}
    for dev in ("disk0", "cdrom0", "nic0"):
        if dev not in peripherals:
            continue
        index = oracle.peripheral(qmp, dev, "bootindex")
        if index < 0:
            continue
        if dev == "nic0":
            key = oracle.peripheral(qmp, dev, "mac")
            order.append((index, "nic", key))
        else:
            entry = next(b for q, b in block.items() if q and dev in q)
            order.append((index, "disk", entry["inserted"]["file"]))
    mapped_lost = {moved[f] for f in moved if is_lost(f)}
    here = [(kind, key) for _, kind, key in sorted(order) if key not in mapped_lost]
    asked = [(kind, moved.get(key, key) if kind == "disk" else key) for kind, key in want.boot
             if kind == "nic" or (key in moved and not is_lost(key))]
    assert here == asked, "boot order"


# ---------------------------------------------------------------- dumpxml -> import -> start

@pytest.mark.slow
def test_a_libvirt_domain_imports_starts_and_stops(kr, tiny_guest):
    """The README's way out of libvirt, with the tiny guest: a domain XML as `virsh dumpxml`
    writes it, `kvmrun import`, `kvmrun start`, the guest boots on the serial console, and
    `kvmrun stop` powers it off through ACPI."""
    xml = kr.base / "g1.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>g1</name>
  <uuid>5e0b7f4c-4a2e-4d7e-9a51-6a3c1d0f2b11</uuid>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>{tiny_guest.kernel}</kernel>
    <initrd>{tiny_guest.initrd}</initrd>
    <cmdline>console={tiny_guest.console} quiet</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    imported = kr.ok("import", xml)
    assert imported.out.startswith("imported g1 (") and imported.err == ""
    kr.ok("start", "g1")
    log = kr.guest_dir("g1") / "serial.log"
    deadline = time.monotonic() + 180
    while tiny_guest.ready_marker not in (log.read_text(errors="replace")
                                          if log.exists() else ""):
        assert time.monotonic() < deadline, "the guest never booted"
        time.sleep(0.5)
    stopped = kr.ok("stop", "g1")
    assert "powered off" in stopped.out
    assert kr.status("g1")["state"] == "stopped"
