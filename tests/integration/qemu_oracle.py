"""QEMU as the oracle of the compiler: start a compiled command line paused (`-S`) under TCG,
ask QEMU over QMP what it built, and compare that with what the profile asked for.

`prepare()` copies a profile into a scratch directory and creates the files it names (qcow2 or
raw disks, an ISO, a kernel QEMU's loaders accept, a device tree), since the vCPUs never run;
`launch()` starts QEMU and yields a connected QMP client; `confirm()` runs the comparisons.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

from kvmrun import arch as archmod
from kvmrun import records
from kvmrun.storage import cloudinit
from kvmrun.storage import disks as storage
from kvmrun.guest.helpers import Helper
from kvmrun.qemu import host as hostmod
from kvmrun.qemu.compile import HostFacts, boot_indexes, build, stable_mac
from kvmrun.paths import RunPaths
from kvmrun.profile import Profile, load, referenced_files

MiB = 1024 * 1024
START_TIMEOUT = 30.0          # seconds for QEMU to open its monitor socket

# The installed UEFI images, as kvmrun.qemu.host.probe would find them.
UEFI = {a.name: code for a in archmod.ARCHES.values()
        for code in a.uefi_code[:1] if os.path.exists(code)}
SECURE = {a.name: code for a in archmod.ARCHES.values()
          for code, store in a.uefi_secure[:1] if os.path.exists(code) and os.path.exists(store)}
TCG_HOST = HostFacts(machine=archmod.host_machine(), kvm=False, forced_accel="tcg", uefi=UEFI,
                     uefi_secure=SECURE, virtiofsd=hostmod.virtiofsd_binary(),
                     swtpm=shutil.which("swtpm"))

# profile key -> (peripheral id QEMU gives the device, bootindex letter)
DEVICE_IDS = {"rng": "rng0", "balloon": "balloon0", "agent": "vserial0", "tablet": "usb0"}


class QemuRefused(AssertionError):
    """QEMU exited instead of opening its monitor: it rejected the command line."""


# ---------------------------------------------------------------- the files a profile names

def bzimage() -> bytes:
    """The smallest file QEMU's x86 Linux loader accepts: a boot-protocol 2.15 setup header."""
    setup_sects = 1
    image = bytearray(512 * (setup_sects + 2))
    image[0x1F1] = setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)       # protocol version
    image[0x211] = 0x01                                 # LOADED_HIGH
    struct.pack_into("<I", image, 0x22C, 0x37FFFFFF)   # initrd_addr_max
    return bytes(image)


def make_dtb(path: Path) -> None:
    subprocess.run(["qemu-system-aarch64", "-machine", f"virt,dumpdtb={path}",
                    "-nodefaults", "-display", "none"], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=60)


def make_iso(path: Path) -> None:
    content = path.parent / f".{path.name}.readme"
    content.write_text("kvmrun oracle test medium\n")
    subprocess.run(["genisoimage", "-quiet", "-V", "KVMRUN", "-o", str(path), str(content)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def make_files(profile: Profile, workdir: Path) -> None:
    """Create every file the profile references under workdir (a disk keeps its declared
    format)."""
    formats = {d.path: d.format for d in profile.disks}
    for _loc, what, path in referenced_files(profile):
        target = Path(path)
        if not target.is_relative_to(workdir):
            assert target.exists(), f"{what} {path} is outside the scratch directory"
            continue                # an absolute path to a host file: never overwrite it
        target.parent.mkdir(parents=True, exist_ok=True)
        if what == "shared directory":
            target.mkdir(exist_ok=True)
        elif what in ("disk", "backing image"):
            # 64 MiB: SD cards must be a power of two in size
            subprocess.run(["qemu-img", "create", "-q", "-f", formats[path] or "qcow2",
                            str(target), "64M"], check=True, stdin=subprocess.DEVNULL,
                           timeout=60)
        elif what == "CD-ROM image":
            make_iso(target)
        elif what == "kernel path":
            target.write_bytes(bzimage() if profile.arch in ("x86_64", "i386")
                               else bytes(4096))
        elif what == "kernel dtb":
            make_dtb(target)
        else:                       # initrd, firmware image
            target.write_bytes(bytes(64 * 1024))


def prepare(profile_file: Path, workdir: Path, overrides: list[str] = ()) -> Profile:
    """Copy the profile (and the YAML beside it, for `extends`) into workdir, load it from
    there so its relative paths land in workdir, and create the files it names."""
    copy = workdir / "profile"
    shutil.copytree(profile_file.parent, copy,
                    ignore=lambda d, names: [n for n in names
                                             if not n.endswith((".yaml", ".yml"))
                                             and not (Path(d) / n).is_dir()])
    profile = load(copy / profile_file.name, overrides)
    make_files(profile, workdir)
    return profile


# ---------------------------------------------------------------- host resources

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_ports(profile: Profile) -> Profile:
    """The profile with each forward's host port and the gdb port moved to a free port, so
    runs never collide with each other or with services on this host."""
    def move(fwd: str) -> str:
        proto, haddr, rest = fwd.split(":", 2)
        return f"{proto}:{haddr}:{free_port()}-{rest.split('-', 1)[1]}"
    nets = tuple(records.replace(n, forward=tuple(move(f) for f in n.forward))
                 for n in profile.network)
    gdb = profile.gdb                   # a unix socket (gdb: true) needs no free port
    if gdb and gdb != "unix":
        gdb = f"{gdb.rsplit(':', 1)[0]}:{free_port()}"
    return records.replace(profile, network=nets, gdb=gdb)


def run_paths(workdir: Path) -> RunPaths:
    run = workdir / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return RunPaths(run, nvram=run / "VARS.fd", tpm=workdir / "tpm")


def make_nvram(profile: Profile, paths: RunPaths) -> None:
    """What the supervisor does before a UEFI start: the VM's own copy of the variables."""
    if profile.firmware == "uefi" and paths.nvram:
        a = archmod.get(profile.arch)
        template = a.uefi_secure[0][1] if profile.secure_boot else \
            next(v for v in a.uefi_vars if os.path.exists(v))
        shutil.copyfile(template, paths.nvram)


# ---------------------------------------------------------------- running QEMU

@contextlib.contextmanager
def launch(argv: list[str], paths: RunPaths, workdir: Path) -> Iterator[QEMUMonitorProtocol]:
    """Start QEMU paused and yield a QMP client on its monitor; QEMU is gone afterwards."""
    stderr_path = workdir / "qemu.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([*argv, "-S"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir)
    try:
        qmp = _connect(proc, paths)
        if qmp is None:
            raise QemuRefused(f"QEMU exited with {proc.returncode}:\n"
                              f"{stderr_path.read_text().strip()}\n"
                              f"command: {shlex.join(argv)}")
        gone = contextlib.suppress(EOFError, ConnectionResetError)   # QEMU quits before it
        try:                                                          # says so: success
            yield qmp
            with gone:
                qmp.cmd("quit")
        finally:
            with gone:
                qmp.close()
        proc.wait(timeout=START_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _connect(proc: subprocess.Popen, paths: RunPaths) -> QEMUMonitorProtocol | None:
    """A QMP client on QEMU's monitor, or None once QEMU has exited (it refused the
    command line: it may create its sockets before it fails)."""
    deadline = time.monotonic() + START_TIMEOUT
    while proc.poll() is None:
        if paths.qmp.exists():
            qmp = QEMUMonitorProtocol(str(paths.qmp))
            try:
                qmp.connect()
                qmp.settimeout(START_TIMEOUT)
                return qmp
            except (ConnectError, OSError):     # not listening yet, or exiting
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU opened no monitor in {START_TIMEOUT} s")
        time.sleep(0.02)
    return None


# ---------------------------------------------------------------- what QEMU built

def peripheral(qmp: QEMUMonitorProtocol, dev_id: str, prop: str):
    return qmp.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property=prop)


def machine_type(qmp: QEMUMonitorProtocol, asked: str) -> tuple[str, str]:
    """(expected QOM type of the machine asked for, QOM type QEMU built)."""
    for m in qmp.cmd("query-machines"):
        if asked in (m["name"], m.get("alias")):
            expected = f"{m['name']}-machine"
            break
    else:
        raise AssertionError(f"QEMU lists no machine {asked!r}")
    return expected, qmp.cmd("qom-get", path="/machine", property="type")


def _option(argv: list[str], option: str) -> str | None:
    """The value of the last `option` in argv, if any."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]
    return values[-1] if values else None


def _cpu_typename(qmp: QEMUMonitorProtocol, model: str) -> str | None:
    """The QOM type of a CPU model (None where QEMU cannot list them, e.g. riscv in 7.2)."""
    try:
        definitions = qmp.cmd("query-cpu-definitions")
    except Exception:                   # ExecuteError: not offered for this target
        return None
    return {d["name"]: d.get("typename") for d in definitions}.get(model)


def confirm(qmp: QEMUMonitorProtocol, profile: Profile, paths: RunPaths,
            argv: list[str]) -> None:
    """Assert that the paused QEMU (started from argv) holds what the profile asked for."""
    a = archmod.get(profile.arch)
    summary = qmp.cmd("query-memory-size-summary")
    assert summary["base-memory"] == profile.memory * MiB, "memory"
    cpus = qmp.cmd("query-cpus-fast")
    assert len(cpus) == profile.smp, "vCPU count"
    asked = profile.cpu or _option(argv, "-cpu")       # else the compiler's default, if any
    if asked:
        model = asked.split(",")[0]
        cpu_type = qmp.cmd("qom-get", path=cpus[0]["qom-path"], property="type")
        # an alias (ppc64's power9) names its type: power9 -> power9_v2.0-powerpc64-cpu
        assert (cpu_type.startswith(f"{model}-") or cpu_type == _cpu_typename(qmp, model)), \
            f"CPU model {model}: QEMU built {cpu_type}"
    assert qmp.cmd("query-kvm")["enabled"] is False, "TCG, not KVM"
    expected, built = machine_type(qmp, profile.machine or a.machine)
    assert built == expected, "machine type"
    assert qmp.cmd("query-status")["running"] is False

    block = {b["device"]: b for b in qmp.cmd("query-block")}
    for i, disk in enumerate(profile.disks):
        entry = block[f"drive-disk{i}"]
        assert f"disk{i}" in entry.get("qdev", ""), f"disk {i} is attached to its device"
        assert entry["inserted"]["file"] == disk.path, f"disk {i} file"
        assert entry["inserted"]["ro"] == disk.readonly, f"disk {i} read-only flag"
        if disk.format:
            assert entry["inserted"]["drv"] == disk.format, f"disk {i} format"
    if profile.cdrom:
        cd = block["drive-cdrom0"]
        assert "cdrom0" in cd.get("qdev", "")
        assert cd["removable"] is True, "CD-ROM is removable"
        assert cd["inserted"]["file"] == profile.cdrom
        assert cd["inserted"]["ro"] is True, "CD-ROM is read-only"
    if profile.cloud_init:
        seed = block["drive-cidata"]
        assert "cidata" in seed.get("qdev", ""), "the seed is attached to its device"
        assert seed["inserted"]["file"] == str(paths.cidata), "seed file"
        assert seed["inserted"]["ro"] is True, "the seed is read-only"
        assert seed["removable"] is (profile.cloud_init.interface != "virtio"), \
            "a virtio seed is a disk, an ide/scsi seed a CD-ROM"
    if profile.firmware == "uefi":
        code = (SECURE if profile.secure_boot else UEFI)[a.name]
        assert block["pflash0"]["inserted"]["file"] == code
        assert block["pflash0"]["inserted"]["ro"] is True
        assert block["pflash1"]["inserted"]["file"] == str(paths.nvram)
    if a.smm:                      # Secure Boot's code needs SMM and a pflash only SMM writes
        smm = qmp.cmd("qom-get", path="/machine", property="smm")
        assert (smm == "on") if profile.secure_boot else (smm != "on"), f"smm is {smm}"
    if a.smm and profile.firmware == "uefi":
        for unit in (0, 1):
            assert qmp.cmd("qom-get", path=f"/machine/system.flash{unit}", property="secure") \
                is profile.secure_boot, f"pflash{unit} secure"

    peripherals = {p["name"] for p in qmp.cmd("qom-list", path="/machine/peripheral")}
    boot = boot_indexes(profile)
    bootable = {"d": "cdrom0" if profile.cdrom else None,
                "c": "disk0" if profile.disks and profile.disks[0].interface != "sd"
                else None,
                "n": "nic0" if profile.network and profile.network[0].type != "none"
                else None}
    for letter, dev_id in bootable.items():
        if dev_id in peripherals:             # an on-board NIC (-nic) has no bootindex
            assert peripheral(qmp, dev_id, "bootindex") == boot.get(letter, -1), \
                f"bootindex of {dev_id}"
    network = qmp.cmd("human-monitor-command", **{"command-line": "info network"})
    nics = {mac: model for model, mac in re.findall(r"type=nic,model=([^,]+),macaddr=(\S+)",
                                                    network)}
    expected = {net.mac or stable_mac(profile.name, i): net.model
                for i, net in enumerate(profile.network) if net.type != "none"}
    assert set(nics) == set(expected), "NIC MAC addresses"
    for mac, model in expected.items():
        assert model is None or nics[mac] == model, f"model of NIC {mac}"
    usernet = qmp.cmd("human-monitor-command", **{"command-line": "info usernet"})
    for net in profile.network:
        for fwd in net.forward:
            host_port = fwd.split(":")[2].split("-")[0]
            assert f" {host_port} " in usernet.replace("\t", " "), f"forward {fwd}"
    wanted = set(profile.devices) | ({"agent"} if profile.shutdown.method == "agent" else set())
    for device in wanted:
        assert DEVICE_IDS[device] in peripherals, f"device {device}"

    chardevs = {c["label"]: c["filename"] for c in qmp.cmd("query-chardev")}
    if profile.serial == "none":
        assert "serial0" not in chardevs
    elif profile.serial == "stdio":
        assert chardevs["serial0"] == "stdio"
    else:
        assert f"unix:{paths.console}," in chardevs["serial0"], "serial console socket"
        assert paths.serial_log.exists() == (profile.serial == "log"), "serial log file"
    if profile.display == "vnc":
        assert qmp.cmd("query-vnc")["enabled"] is True
    if profile.display == "spice":
        assert qmp.cmd("query-spice")["enabled"] is True
    fs = [(i, s) for i, s in enumerate(profile.shares) if s.type == "virtiofs"]
    for i, share in fs:
        assert peripheral(qmp, f"share{i}", "type") == f"vhost-user-fs-{a.virtio}"
        assert peripheral(qmp, f"share{i}", "tag") == share.tag, f"tag of share {i}"
    if fs:                                  # virtiofsd maps guest RAM: a shared memfd
        assert [m["share"] for m in qmp.cmd("query-memdev")] == [True], "shared RAM"
    tpms = [(t["model"], t["options"]["type"]) for t in qmp.cmd("query-tpm")]
    model = (a.tpm or "").removesuffix("-device")       # QMP names tpm-tis-device tpm-tis
    assert tpms == ([(model, "emulator")] if profile.tpm else []), f"TPM: {tpms}"


def check_profile(profile: Profile, workdir: Path) -> list[str]:
    """Compile for TCG, start QEMU paused, confirm; returns the argv that was run."""
    profile = with_free_ports(storage.with_formats(profile))
    paths = run_paths(workdir)
    make_nvram(profile, paths)
    if profile.cloud_init:                  # what start does: the seed in the run directory
        cloudinit.build_seed(profile, paths.cidata)
    compiled = build(profile, TCG_HOST, paths)
    with launch_compiled(profile, compiled, paths, workdir) as qmp:
        confirm(qmp, profile, paths, compiled.argv)
    return compiled.argv


@contextlib.contextmanager
def launch_compiled(profile: Profile, compiled, paths, workdir: Path):
    """`launch` of a compiled profile as the supervisor does it: its helper daemons
    (virtiofsd, swtpm) first, ended after QEMU."""
    if profile.tpm:
        paths.tpm.mkdir(mode=0o700, exist_ok=True)
    with contextlib.ExitStack() as helpers:
        for h in compiled.helpers:
            helpers.enter_context(Helper(h.name, h.argv, h.socket,
                                         paths.helper_log(h.name)))
        with launch(compiled.argv, paths, workdir) as qmp:
            yield qmp
