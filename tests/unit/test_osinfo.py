"""osinfo-db parsing against the database the distribution installed (Debian `osinfo-db`).

The facts checked here are read from the XML files themselves by a second, naive reader
(regular expressions over the text), so the test does not trust the parser it tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmrun.ops import osinfo

DB = Path("/usr/share/osinfo")
pytestmark = pytest.mark.skipif(not (DB / "os").is_dir(), reason="osinfo-db not installed "
                                "(.ci/install-deps installs it)")


def _file_of(short_id: str) -> str:
    for path in (DB / "os").glob("*/*.xml"):
        if f"<short-id>{short_id}</short-id>" in path.read_text():
            return path.read_text()
    raise AssertionError(f"{short_id} not in the database")


def _minimum_ram_mib(text: str, arch: str) -> int:
    block = re.search(rf'<resources arch="{arch}">(.*?)</resources>', text, re.S) or \
        re.search(r'<resources arch="all">(.*?)</resources>', text, re.S)
    minimum = re.search(r"<minimum>(.*?)</minimum>", block.group(1), re.S).group(1)
    return int(re.search(r"<ram>(\d+)</ram>", minimum).group(1)) // 2**20


def test_every_file_parses_and_ids_are_unique():
    entries = osinfo.load_all("x86_64")
    files = list((DB / "os").glob("*/*.xml"))
    assert len(entries) == len(files)
    uris = [e.id for e in entries]
    assert len(set(uris)) == len(uris)
    assert all(e.name and e.short_ids for e in entries)


@pytest.mark.parametrize("short_id", ["debian11", "win11", "win10", "fedora36",
                                      "ubuntu22.04", "alpinelinux3.16"])
def test_minimum_ram_matches_the_xml(short_id):
    entry = osinfo.get(short_id, "x86_64")
    assert entry.minimum.ram_mib == _minimum_ram_mib(_file_of(short_id), "x86_64")


def test_debian11():
    e = osinfo.get("debian11", "x86_64")
    assert (e.id, e.name, e.codename, e.family) == (
        "http://debian.org/debian/11", "Debian 11", "bullseye", "linux")
    assert e.recommended.storage_gib == 20 and e.minimum.cpus == 1
    # debian-11.xml lists only virtio-gpu and -fs: virtio disk and NIC come from Debian 10
    # and older through derives-from, as libosinfo inherits devices
    text = _file_of("debian11")
    assert "1af4/1001" not in text and "1af4/1042" not in text
    assert e.virtio_disk and e.virtio_net and e.nic_model == "virtio-net"
    assert "debianbullseye" in e.short_ids and osinfo.get("debianbullseye").id == e.id


def test_windows_11_needs_uefi_and_has_no_virtio():
    e = osinfo.get("win11", "x86_64")
    assert 'type="bios" supported="false"' in _file_of("win11")
    assert e.firmware == "uefi" and e.uefi_supported
    assert not e.virtio_disk and not e.virtio_net and e.nic_model == "e1000e"
    assert (e.minimum.ram_mib, e.minimum.cpus, e.minimum.storage_gib) == (4096, 2, 64)
    # Windows 11 says only minimums: it must not take Windows 10's recommendations
    assert e.recommended.ram_mib is None


def test_windows_10_boots_either_firmware():
    assert osinfo.get("win10", "x86_64").firmware is None


def test_search_needs_every_word():
    found = [e.short_id for e in osinfo.search("windows 11", "x86_64")]
    assert "win11" in found and "win10" not in found
    debian = [e.short_id for e in osinfo.search("debian", "x86_64")]
    assert debian[0] == "debian11"              # newest first within a distribution
    assert osinfo.search("no-such-os-anywhere") == []


def test_unknown_id_suggests_close_ones():
    with pytest.raises(osinfo.OsinfoError) as e:
        osinfo.get("debian1")
    assert "did you mean" in e.value.hint and "debian11" in e.value.hint


def test_missing_database_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KVMRUN_OSINFO_DIR", str(tmp_path))
    assert not osinfo.available()
    with pytest.raises(osinfo.OsinfoError) as e:
        osinfo.get("debian11")
    assert "apt-get install osinfo-db" in str(e.value)
