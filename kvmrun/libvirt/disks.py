"""The <disk>s of a libvirt domain -> kvmrun's disks and CD-ROM (see kvmrun.libvirt.devices)."""

from __future__ import annotations

from kvmrun.libvirt._xml import Node, consume


class Devices:
    """State while the devices are read: boot orders refer to kvmrun's disks and NICs."""

    def __init__(self, b):
        self.b = b
        self.disks: list[dict] = []
        self.nets: list[dict] = []
        self.cdrom: Node | None = None
        self.boot: list[tuple[int, str | None, Node]] = []   # (order, letter, node)
        self.wanted: list[str] = []

    def boot_order(self, node: Node, letter: str | None) -> None:
        boot = node.find("boot")
        if boot is None:
            return
        boot.use()
        boot.attr("loadparm")
        order = boot.attr("order") or ""
        if order.isdigit():
            self.boot.append((int(order), letter, boot))



DISK_BUS = {"virtio": "virtio", "ide": "ide", "scsi": "scsi", "sata": "ide", "sd": "sd",
            "nvme": "nvme"}
CACHE = ("none", "writeback", "writethrough", "directsync", "unsafe")


def _disk(d: Devices, disk: Node) -> None:
    b = d.b
    kind, device = disk.attr("type") or "file", disk.attr("device") or "disk"
    target = disk.find("target")
    bus = target.use().attr("bus") if target is not None else None
    if target is not None:
        target.read.update(("dev", "tray"))
    if device not in ("disk", "cdrom"):
        return b.drop(disk, f"{device} drives are not supported")
    if kind not in ("file", "block", "volume"):
        return b.drop(disk, f"disk type {kind!r} (storage QEMU reaches itself) is not "
                            "supported: give kvmrun a file or block device")
    entry = _source(b, disk, kind, device)
    if entry is None:
        return None
    fmt, cache = _driver(b, disk.find("driver"))
    path = entry.get("path")
    if device == "cdrom":
        return _cdrom(d, disk, bus, path)
    if bus not in DISK_BUS:
        return b.drop(disk, f"disks on bus {bus!r} are not supported")
    if path and any(x.get("path") == path and not x.get("readonly") for x in d.disks):
        return b.drop(disk, f"{path} is already attached writable: two writable disks on "
                            "one image corrupt it")
    entry["interface"] = _interface(b, disk, target, bus)
    if fmt and "pool" not in entry:
        entry["format"] = fmt
    if cache:
        entry["cache"] = cache
    if disk.find("readonly") is not None:
        disk.find("readonly").use()
        entry["readonly"] = True
        if entry["interface"] in ("ide", "sd"):
            b.loss(disk, f"QEMU cannot attach a read-only {bus} disk: it becomes a read-only "
                         "SCSI disk")
            entry["interface"] = "scsi"
    backing = _backing(b, disk.find("backingStore"))
    if backing:
        entry["backing"] = backing
        if entry.get("format") == "raw":
            entry.pop("format")
    index = len(d.disks)
    d.boot_order(disk, "c" if index == 0 else None)
    d.disks.append(entry)
    b.lines[("disks", index)] = (b.source, disk.line)
    return None


def _source(b, disk: Node, kind: str, device: str) -> dict | None:
    """{"path": …} or {"pool": …, "volume": …}; None (and a loss) when there is none."""
    source = disk.find("source")
    entry: dict = {}
    if source is not None:
        source.use()
        source.attr("startupPolicy")
        if kind == "volume":
            pool, volume = source.attr("pool"), source.attr("volume")
            source.attr("mode")
            if not (pool and volume and b.pool_exists(pool)):
                b.drop(disk, f"pool {pool!r} is not a kvmrun pool (kvmrun pool define "
                             f"{pool} DIR), so volume {volume!r} cannot be found")
                return None
            entry = {"pool": pool, "volume": volume}
        elif source.attr("file" if kind == "file" else "dev"):
            entry = {"path": source.attrs["file" if kind == "file" else "dev"]}
            b.check_path(source, entry["path"], "CD-ROM image" if device == "cdrom" else "disk")
    if not entry:
        b.drop(disk, f"an empty {'CD-ROM drive' if device == 'cdrom' else 'disk'} (no "
                     "<source>) is not supported")
        return None
    return entry


def _driver(b, driver: Node | None) -> tuple[str | None, str | None]:
    """(format, cache): libvirt never probes, so no type means raw."""
    if driver is None:
        return "raw", None
    driver.use()
    driver.attr("name")
    fmt, cache = driver.attr("type") or "raw", driver.attr("cache")
    if fmt not in ("raw", "qcow2"):
        b.loss(driver, f"image format {fmt!r} is not supported (qcow2 or raw)", "type")
        fmt = None
    return fmt, cache if cache in CACHE else None


def _interface(b, disk: Node, target: Node, bus: str) -> str:
    machine = b.data.get("machine") or ""
    if bus == "sd" and machine.startswith("vexpress"):
        b.loss(target, "the board's own SD card slot is not supported: the disk becomes a "
                       "virtio disk (virtio-mmio)")
        return "virtio"
    if bus == "sata" and (machine or "q35") != "q35":
        b.note(disk, "the SATA disk becomes an IDE disk (kvmrun's IDE on this machine)")
    return DISK_BUS[bus]


def _cdrom(d: Devices, disk: Node, bus: str | None, path: str | None) -> None:
    b = d.b
    ro = disk.find("readonly")
    if ro is not None:
        ro.use()
    if d.cdrom is not None:
        return b.drop(disk, f"a second CD-ROM drive is not supported (kvmrun has one, "
                            f"{d.cdrom.path})")
    if path is None:
        return b.drop(disk, "a CD-ROM from a storage pool is not supported")
    d.cdrom = disk
    b.set(("cdrom",), path, disk)
    home = "ide" if (b.arch or "x86_64") in ("x86_64", "i386") else "scsi"
    if DISK_BUS.get(bus or home) != home:
        b.loss(disk, f"the {bus} CD-ROM becomes kvmrun's CD-ROM, which is {home.upper()} here")
    d.boot_order(disk, "d")


def _backing(b, node: Node | None) -> str | None:
    if node is None:
        return None
    consume(node)
    source = node.find("source")
    path = source.attrs.get("file") or source.attrs.get("dev") if source is not None else None
    if path and node.find("backingStore") is not None:
        b.note(node, f"only the first backing image ({path}) is named; the rest of the chain "
                     "is in the images' headers")
    return path
