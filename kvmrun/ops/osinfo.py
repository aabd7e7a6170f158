"""OS presets from the distribution's osinfo-db (the database virt-install and virt-manager use).

The XML files under /usr/share/osinfo/os (Debian package `osinfo-db`) are read with the
standard library's ElementTree: no libosinfo, no GObject bindings. All ~800 files parse in
about 0.2 s, so nothing is cached on disk.

What kvmrun takes from an entry: names and ids, recommended and minimum RAM, vCPUs and disk
size (for the host's architecture, else `arch="all"`), whether virtio disks and NICs are
supported (the virtio PCI ids in its device list), which other NIC it knows (e1000e, e1000,
rtl8139), and its firmware needs (`<firmware type="efi"/>` with `bios supported="false"`
means UEFI only). An entry without resources or devices inherits them through
`derives-from` and `clones`, as libosinfo does. This version of the database has no TPM
entries, so `tpm` is reported only when the data says so.
"""

from __future__ import annotations

import functools
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from kvmrun.arch import host_arch
from kvmrun.errors import OsinfoError
from kvmrun.records import field, record

DEFAULT_DIR = "/usr/share/osinfo"
LANG = "{http://www.w3.org/XML/1998/namespace}lang"

VIRTIO_DISK = {"http://pcisig.com/pci/1af4/1001", "http://pcisig.com/pci/1af4/1042"}
VIRTIO_NET = {"http://pcisig.com/pci/1af4/1000", "http://pcisig.com/pci/1af4/1041"}
# other NICs an OS may know, best first: PCI id -> QEMU model
OTHER_NICS = (("http://pcisig.com/pci/8086/10d3", "e1000e"),
              ("http://pcisig.com/pci/8086/100e", "e1000"),
              ("http://pcisig.com/pci/10ec/8139", "rtl8139"))
# osinfo's arch names -> kvmrun's
ARCHES = {"x86_64": "x86_64", "i686": "i386", "i386": "i386", "aarch64": "aarch64",
          "armv7l": "arm", "ppc64le": "ppc64", "s390x": "s390x", "riscv64": "riscv64"}


@record(frozen=True)
class Resources:
    ram_mib: int | None = None
    cpus: int | None = None
    storage_gib: int | None = None

    def to_json(self) -> dict:
        return {"ram_mib": self.ram_mib, "cpus": self.cpus, "storage_gib": self.storage_gib}


@record(frozen=True)
class OsEntry:
    """One operating system of osinfo-db, with inheritance already applied."""

    id: str                                   # the URI, e.g. http://debian.org/debian/11
    short_ids: tuple[str, ...]
    name: str
    version: str | None = None
    vendor: str | None = None
    family: str | None = None
    distro: str | None = None
    codename: str | None = None
    release_date: str | None = None
    eol_date: str | None = None
    minimum: Resources = field(default_factory=Resources)
    recommended: Resources = field(default_factory=Resources)
    virtio_disk: bool = False
    virtio_net: bool = False
    nic_model: str | None = None              # the NIC kvmrun gives it: virtio-net or other
    firmware: str | None = None               # "uefi" when BIOS is unsupported, else None
    uefi_supported: bool = False
    tpm: bool = False
    arches: tuple[str, ...] = ()              # kvmrun arch names it has media or trees for
    file: str = ""

    @property
    def short_id(self) -> str:
        return self.short_ids[0] if self.short_ids else self.id

    def to_json(self) -> dict:
        return {"id": self.short_id, "uri": self.id, "short_ids": list(self.short_ids),
                "name": self.name, "version": self.version, "vendor": self.vendor,
                "family": self.family, "distro": self.distro, "codename": self.codename,
                "release_date": self.release_date, "eol_date": self.eol_date,
                "minimum": self.minimum.to_json(), "recommended": self.recommended.to_json(),
                "virtio_disk": self.virtio_disk, "virtio_net": self.virtio_net,
                "nic_model": self.nic_model, "firmware": self.firmware,
                "uefi_supported": self.uefi_supported, "tpm": self.tpm,
                "arches": list(self.arches), "file": self.file}


def db_dir() -> Path:
    """$KVMRUN_OSINFO_DIR (tests, other prefixes) or /usr/share/osinfo."""
    return Path(os.environ.get("KVMRUN_OSINFO_DIR") or DEFAULT_DIR)


def available() -> bool:
    return (db_dir() / "os").is_dir()


def _require_db() -> Path:
    base = db_dir()
    if not (base / "os").is_dir():
        raise OsinfoError(f"osinfo-db is not installed (no {base / 'os'})",
                          hint="install it: sudo apt-get install osinfo-db "
                               "(or give --memory, --cpus and --disk without --os)")
    return base


# ---------------------------------------------------------------- raw XML


def _text(el: ET.Element, tag: str) -> str | None:
    """The untranslated text of the first child `tag` (no xml:lang)."""
    for child in el.findall(tag):
        if LANG not in child.attrib and child.text:
            return child.text.strip()
    return None


def _number(el: ET.Element | None, tag: str) -> int | None:
    if el is None:
        return None
    value = el.findtext(tag)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _resources(os_el: ET.Element, kind: str, arch: str) -> dict:
    """{ram, cpus, storage} of <resources><minimum|recommended> for `arch` (else "all")."""
    chosen: dict = {}
    for res in os_el.findall("resources"):
        which = res.get("arch", "all")
        if which not in (arch, "all"):
            continue
        block = res.find(kind)
        values = {"ram": _number(block, "ram"), "cpus": _number(block, "n-cpus"),
                  "storage": _number(block, "storage")}
        for key, value in values.items():
            if value is not None and (which == arch or key not in chosen):
                chosen[key] = value
    return chosen


def _raw(path: Path, arch: str) -> dict:
    """The facts of one file, before inheritance."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise OsinfoError(f"cannot read {path}: {e}") from e
    os_el = root.find("os")
    if os_el is None:
        raise OsinfoError(f"{path} has no <os> element")
    devices = {d.get("id") for d in os_el.findall("devices/device")}
    firmwares = [(f.get("type"), f.get("supported", "true") != "false", f.get("arch"))
                 for f in os_el.findall("firmware")]
    arches = {ARCHES.get(m.get("arch", ""), "") for m in os_el.findall("media")}
    arches |= {ARCHES.get(t.get("arch", ""), "") for t in os_el.findall("tree")}
    return {
        "id": os_el.get("id"), "file": str(path),
        "short_ids": tuple(s.text.strip() for s in os_el.findall("short-id") if s.text),
        "name": _text(os_el, "name"), "version": _text(os_el, "version"),
        "vendor": _text(os_el, "vendor"), "family": _text(os_el, "family"),
        "distro": _text(os_el, "distro"), "codename": _text(os_el, "codename"),
        "release_date": _text(os_el, "release-date"), "eol_date": _text(os_el, "eol-date"),
        "parents": [e.get("id") for e in os_el.findall("derives-from") + os_el.findall(
            "clones") if e.get("id")],
        "resources": {kind: _resources(os_el, kind, arch)
                      for kind in ("minimum", "recommended")},
        "devices": devices, "firmwares": firmwares, "arches": sorted(arches - {""}),
    }


# ---------------------------------------------------------------- inheritance


def _inherited(raw: dict, by_id: dict, key: str, seen: frozenset = frozenset()):
    """raw[key] if it says something, else the first parent's that does (resources: as a
    whole, so an entry with only minimums does not take an older release's recommendations)."""
    if any(raw[key].values()) if isinstance(raw[key], dict) else raw[key]:
        return raw[key]
    for parent in raw["parents"]:
        if parent in by_id and parent not in seen:
            value = _inherited(by_id[parent], by_id, key, seen | {raw["id"]})
            if any(value.values()) if isinstance(value, dict) else value:
                return value
    return raw[key]


def _all_devices(raw: dict, by_id: dict, seen: frozenset = frozenset()) -> set:
    devices = set(raw["devices"])
    for parent in raw["parents"]:
        if parent in by_id and parent not in seen:
            devices |= _all_devices(by_id[parent], by_id, seen | {raw["id"]})
    return devices


def _firmware(firmwares: list, arch: str) -> tuple[str | None, bool]:
    """(firmware kvmrun must use, UEFI supported) from <firmware> entries for `arch`."""
    mine = [(kind, ok) for kind, ok, where in firmwares if where in (None, arch)]
    uefi = any(kind == "efi" and ok for kind, ok in mine)
    bios_refused = any(kind == "bios" and not ok for kind, ok in mine)
    return ("uefi" if uefi and bios_refused else None), uefi


def _entry(raw: dict, by_id: dict, osinfo_arch: str) -> OsEntry:
    devices = _all_devices(raw, by_id)
    resources = _inherited(raw, by_id, "resources")
    minimum, recommended = resources["minimum"], resources["recommended"]
    firmware, uefi = _firmware(_inherited(raw, by_id, "firmwares"), osinfo_arch)
    virtio_net = bool(devices & VIRTIO_NET)
    other = next((model for pci, model in OTHER_NICS if pci in devices), None)

    def res(d: dict) -> Resources:
        ram, storage = d.get("ram"), d.get("storage")
        return Resources(ram // 2**20 if ram else None, d.get("cpus"),
                         -(-storage // 2**30) if storage else None)
    return OsEntry(
        id=raw["id"], short_ids=raw["short_ids"], name=raw["name"] or raw["id"],
        version=raw["version"], vendor=raw["vendor"], family=raw["family"],
        distro=raw["distro"], codename=raw["codename"], release_date=raw["release_date"],
        eol_date=raw["eol_date"], minimum=res(minimum), recommended=res(recommended),
        virtio_disk=bool(devices & VIRTIO_DISK), virtio_net=virtio_net,
        nic_model="virtio-net" if virtio_net else other, firmware=firmware,
        uefi_supported=uefi, tpm=any("tpm" in d for d in devices),
        arches=tuple(raw["arches"]), file=raw["file"])


def _osinfo_arch(arch: str | None) -> str:
    arch = arch or host_arch()
    return next((k for k, v in ARCHES.items() if v == arch), arch)


def load_all(arch: str | None = None) -> list[OsEntry]:
    """Every OS in the database (for the host's architecture unless `arch`), newest first
    within a distribution, sorted by name otherwise. Read once per process (the web UI
    searches it per keystroke)."""
    base = _require_db()
    return list(_load(base, _osinfo_arch(arch)))


@functools.lru_cache(maxsize=4)
def _load(base: Path, osinfo_arch: str) -> tuple[OsEntry, ...]:
    raws = [_raw(p, osinfo_arch) for p in sorted((base / "os").glob("*/*.xml"))]
    by_id = {r["id"]: r for r in raws if r["id"]}
    entries = [_entry(r, by_id, osinfo_arch) for r in raws if r["id"]]
    return tuple(sorted(entries, key=_sort_key))


def _sort_key(entry: OsEntry) -> tuple:
    version = [int(p) if p.isdigit() else 0 for p in re.split(r"[.-]", entry.version or "")]
    return (entry.distro or entry.name, [-v for v in version], entry.name)


def search(text: str | None = None, arch: str | None = None) -> list[OsEntry]:
    """Entries whose short ids, name, vendor, distro or codename contain every word of
    `text` (case-insensitive)."""
    entries = load_all(arch)
    if not text:
        return entries
    words = text.lower().split()

    def haystack(e: OsEntry) -> str:
        return " ".join([*e.short_ids, e.name, e.vendor or "", e.distro or "",
                         e.codename or "", e.family or ""]).lower()
    return [e for e in entries if all(w in haystack(e) for w in words)]


def get(os_id: str, arch: str | None = None) -> OsEntry:
    """The entry whose short id (`debian11`) or URI is `os_id`."""
    entries = load_all(arch)
    for entry in entries:
        if os_id == entry.id or os_id in entry.short_ids:
            return entry
    close = [e.short_id for e in entries if os_id.lower() in " ".join(e.short_ids).lower()]
    hint = (f"did you mean {', '.join(close[:5])}?" if close
            else "`kvmrun os list WORD` searches the database")
    raise OsinfoError(f"no OS {os_id!r} in osinfo-db ({db_dir()})", hint=hint)
