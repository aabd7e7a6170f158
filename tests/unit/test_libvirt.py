"""libvirt domain XML <-> kvmrun profiles: the mapping, every corpus file's losses or refusal
pinned, refusals of bad input with their messages, goldens (XML in, profile YAML out), the
round trip profile -> export --format libvirt -> import, schema validation of exported XML
with libvirt's own RelaxNG schema, and a property test: no XML ever gives a traceback.

The corpus is libvirt's own tests/qemuxmlconfdata files (see its README.md), found at
$KVMRUN_LIBVIRT_CORPUS (default: shared/libvirt-domains beside the repository). `KVMRUN_REGEN_GOLDEN=1`
rewrites tests/unit/golden/libvirt/*.yaml and still fails, so a human reads the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmrun import arch as archmod
from kvmrun import records
from kvmrun.ops import defined as store
from kvmrun.ops import libvirt as cli_libvirt
from kvmrun.cli import main
from kvmrun.errors import ProfileError
from kvmrun.libvirt.domain import convert
from kvmrun.libvirt.export import to_xml
from kvmrun.profile import load

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "unit" / "golden" / "libvirt"
CORPUS = Path(os.environ.get("KVMRUN_LIBVIRT_CORPUS")
              or Path(__file__).resolve().parents[3] / "shared" / "libvirt-domains")
CORPUS_FILES = sorted(CORPUS.glob("*.xml"))
REGEN = os.environ.get("KVMRUN_REGEN_GOLDEN") == "1"
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


def conv(text: str | bytes, **kw):
    raw = text.encode() if isinstance(text, str) else text
    kw.setdefault("path_exists", lambda p: True)
    kw.setdefault("pool_exists", lambda p: False)
    return convert(raw, "vm.xml", **kw)


def domain(body: str, kind: str = "kvm") -> str:
    return (f"<domain type='{kind}'><name>vm</name><memory unit='MiB'>512</memory>"
            f"<os><type arch='x86_64' machine='q35'>hvm</type></os>{body}</domain>")


def refusal(text: str | bytes) -> str:
    with pytest.raises(ProfileError) as caught:
        conv(text).profile()
    return str(caught.value)


@pytest.fixture(autouse=True)
def x86_64_host(monkeypatch):
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")


# ---------------------------------------------------------------- the mapping

def test_a_plain_domain_maps_exactly():
    c = conv(domain("<vcpu>3</vcpu><uuid>6D1C9A44-2F0B-4A8E-8A37-5B1E0C9D2E77</uuid>"
                    "<features><acpi/></features><devices><disk type='file' device='disk'>"
                    "<driver name='qemu' type='qcow2' cache='none'/><source file='/i/a.qcow2'/>"
                    "<target dev='vda' bus='virtio'/></disk><interface type='user'>"
                    "<mac address='52:54:00:AA:bb:cc'/><model type='e1000'/></interface>"
                    "</devices>"))
    assert c.losses == [] and c.missing == []
    p = c.profile()
    assert (p.name, p.memory, p.smp, p.machine, p.accel, p.boot) == ("vm", 512, 3, "q35", "kvm",
                                                                     "c")
    assert p.uuid == "6d1c9a44-2f0b-4a8e-8a37-5b1e0c9d2e77"
    assert (p.disks[0].path, p.disks[0].format, p.disks[0].cache) == ("/i/a.qcow2", "qcow2",
                                                                       "none")
    assert (p.network[0].mac, p.network[0].model) == ("52:54:00:aa:bb:cc", "e1000")
    assert p.devices == () and p.serial == "none" and p.display == "none"


@pytest.mark.parametrize("memory, mib", [("<memory>219100</memory>", 214),
                                         ("<memory unit='G'>2</memory>", 2048),
                                         ("<memory unit='bytes'>1073741824</memory>", 1024),
                                         ("<memory unit='MB'>1000</memory>", 954)])
def test_memory_units_round_up_to_whole_mib(memory, mib):
    text = domain("").replace("<memory unit='MiB'>512</memory>", memory)
    assert conv(text).profile().memory == mib


def test_boot_orders_and_cpu_and_events():
    c = conv(domain("<cpu mode='custom' match='exact'><model>qemu64</model>"
                    "<feature policy='disable' name='svm'/><feature policy='require' "
                    "name='pcid'/></cpu><on_reboot>destroy</on_reboot><clock offset='localtime'/>"
                    "<devices><disk type='file' device='cdrom'><source file='/i/x.iso'/>"
                    "<target dev='sda' bus='sata'/><readonly/><boot order='1'/></disk>"
                    "<interface type='network'><source network='default'/>"
                    "<boot order='2'/></interface></devices>"))
    p = c.profile()
    assert c.losses == []
    assert (p.boot, p.cdrom, p.cpu) == ("dn", "/i/x.iso", "qemu64,svm=off,pcid=on")
    assert p.network[0].type == "nat" and p.network[0].name is None
    assert p.qemu_args == ("-rtc", "base=localtime", "-no-reboot")


def test_uefi_nvram_is_to_be_copied_and_a_missing_one_is_a_loss():
    text = domain("").replace("</os>", "<loader readonly='yes' type='pflash'>/x/OVMF_CODE.fd"
                                       "</loader><nvram>/x/vm_VARS.fd</nvram></os>")
    found = conv(text)
    assert found.profile().firmware == "uefi" and found.nvram == "/x/vm_VARS.fd"
    missing = conv(text, path_exists=lambda p: False)
    assert missing.nvram is None
    assert [str(f) for f in missing.losses] == [
        "os/nvram: nvram '/x/vm_VARS.fd' not found: the VM would start with fresh UEFI "
        "variables"]


@pytest.mark.parametrize("firmware", [
    "<firmware><feature enabled='yes' name='secure-boot'/></firmware>",
    "<firmware><feature enabled='yes' name='enrolled-keys'/></firmware>",
    "<loader secure='yes'/>"])
def test_secure_boot_maps_to_uefi_secure(firmware):
    text = domain("<features><acpi/><smm state='on'/></features>").replace(
        "<os>", "<os firmware='efi'>").replace("</os>", firmware + "</os>")
    found = conv(text)
    assert found.losses == []
    assert (found.profile().firmware, found.profile().secure_boot) == ("uefi", True)
    assert not any("SMM" in str(n) and "default" in str(n) for n in found.notes)


@pytest.mark.parametrize("features, loss", [
    ("<feature enabled='yes' name='secure-boot'/><feature enabled='no' name='enrolled-keys'/>",
     "os/firmware/feature[1]: Secure Boot without enrolled keys is not supported: a new variable "
     "store has Microsoft's keys enrolled"),
    ("<feature enabled='no' name='secure-boot'/><feature enabled='yes' name='enrolled-keys'/>",
     "os/firmware/feature[1]: enrolled keys without Secure Boot are not supported: the plain UEFI "
     "variable store has none")])
def test_secure_boot_and_enrolled_keys_go_together(features, loss):
    text = domain("").replace("<os>", "<os firmware='efi'>").replace(
        "</os>", f"<firmware>{features}</firmware></os>")
    assert [str(f) for f in conv(text).losses] == [loss]


def test_pool_volumes_map_when_the_pool_is_kvmrun_s():
    text = domain("<devices><disk type='volume' device='disk'><source pool='tank' "
                  "volume='a.qcow2'/><target dev='vda' bus='virtio'/></disk></devices>")
    assert conv(text, pool_exists=lambda p: p == "tank").data["disks"] == [
        {"pool": "tank", "volume": "a.qcow2", "interface": "virtio"}]
    assert [str(f) for f in conv(text).losses] == [
        "devices/disk[0]: pool 'tank' is not a kvmrun pool (kvmrun pool define tank DIR), "
        "so volume 'a.qcow2' cannot be found"]


def test_missing_paths_are_listed_with_their_xml_path_and_line():
    c = conv(domain("<devices>\n<disk type='block' device='disk'>\n<source dev='/dev/vg/x'/>"
                    "<target dev='sda' bus='scsi'/></disk></devices>"),
             path_exists=lambda p: False)
    assert c.losses == []
    assert [(f.path, f.line, f.message) for f in c.missing] == [
        ("devices/disk[0]/source", 3, "disk /dev/vg/x not found on this host")]


def test_unknown_elements_and_attributes_are_losses_never_dropped():
    c = conv(domain("<devices><hostdev mode='subsystem' type='pci'/><disk type='file'>"
                    "<source file='/a'/><target dev='vda' bus='virtio'/><iotune/>"
                    "<driver name='qemu' type='raw' discard='unmap'/></disk></devices>"
                    "<frobnicate/>"))
    assert [str(f) for f in c.losses] == [
        "devices/hostdev[0]: PCI/USB passthrough is not supported",
        "devices/disk[0]/iotune: <iotune> is not supported by kvmrun",
        "devices/disk[0]/driver/@discard: discard='unmap' is not supported by kvmrun",
        "frobnicate: <frobnicate> is not supported by kvmrun"]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("text, message", [
    (b"", "vm.xml:1: not valid XML: no element found (column 1)"),
    (b"name: web1\nmemory: 2G\n", "vm.xml:1: not valid XML: syntax error (column 1)"),
    (b"<domain type='kvm'><name>x</name>", "vm.xml:1: not valid XML: no element found "
                                           "(column 34)"),
    (b"<?xml version='1.0'?>\n<!DOCTYPE lolz [\n<!ENTITY lol 'lol'>\n<!ENTITY lol2 "
     b"'&lol;&lol;&lol;&lol;'>\n]>\n<domain>&lol2;</domain>",
     "vm.xml:2: DOCTYPE declarations (and so entities) are refused: libvirt domain XML has "
     "none, and entities are how XML bombs work"),
    (b"<!DOCTYPE d SYSTEM 'file:///etc/passwd'><domain/>",
     "vm.xml:1: DOCTYPE declarations (and so entities) are refused: libvirt domain XML has "
     "none, and entities are how XML bombs work"),
    (b"<network><name>default</name></network>",
     "vm.xml:1: not a libvirt domain: the root element is <network>\n  hint: `virsh dumpxml "
     "NAME > NAME.xml` writes a <domain>"),
    (domain("", "xen"), "vm.xml:1: domain type 'xen': kvmrun runs QEMU and KVM guests only"),
    (domain("").replace("x86_64", "mips"), "vm.xml:1: architecture 'mips' is not one kvmrun "
                                          "runs\n  hint: kvmrun runs x86_64, i386, aarch64, "
                                          "arm, riscv64, riscv32, ppc64, s390x"),
    (domain("").replace(">hvm<", ">exe<"), "vm.xml:1: os type 'exe': kvmrun runs "
                                            "full-virtualisation (hvm) guests only"),
    ("<domain type='kvm'><memory>1</memory></domain>", "vm.xml:1: the domain has no <name>"),
    ("<a>" * 60 + "</a>" * 60, "vm.xml:1: elements nested deeper than 48 levels"),
    (domain("").replace("<name>vm</name>", "<name>web 1</name>"),
     "vm.xml:1: name: 'web 1' is not a valid VM name (letters, digits and . _ - between "
     "them)"),
])
def test_bad_input_is_refused_with_a_line(text, message):
    assert refusal(text) == message


def test_a_billion_laughs_is_refused_before_any_expansion():
    bomb = ("<?xml version='1.0'?><!DOCTYPE b [<!ENTITY a0 'ha'>"
            + "".join(f"<!ENTITY a{i} '{('&a%d;' % (i - 1)) * 10}'>" for i in range(1, 10))
            + "]><domain>&a9;</domain>")
    assert "DOCTYPE declarations" in refusal(bomb)


# ---------------------------------------------------------------- libvirt's own corpus

def corpus_outcome(path: Path) -> dict:
    try:
        c = convert(path.read_bytes(), path.name, path_exists=lambda p: True,
                    pool_exists=lambda p: False)
        c.profile()
    except ProfileError as e:
        return {"refused": str(e)}
    return {"losses": [str(f) for f in c.losses]} if c.losses else {"exact": True}


@pytest.mark.skipif(not CORPUS_FILES, reason=f"no libvirt corpus at {CORPUS}")
def test_every_corpus_file_is_imported_or_refused_as_pinned():
    """Exactly, with --lossy and these losses, or refused with this message (disk paths
    taken as present: test_libvirt_oracle.py makes them)."""
    got = {p.name: corpus_outcome(p) for p in CORPUS_FILES}
    pinned = GOLDEN / "corpus-outcomes.yaml"
    text = yaml.safe_dump(got, sort_keys=True, width=100, allow_unicode=True)
    if REGEN:
        pinned.write_text(text)
        pytest.fail(f"rewrote {pinned}; review the diff and run again without "
                    "KVMRUN_REGEN_GOLDEN")
    assert got == yaml.safe_load(pinned.read_text())


# ---------------------------------------------------------------- goldens

@pytest.mark.parametrize("name", ["virt-manager-desktop", "virt-install-cloud"])
def test_xml_converts_to_golden_yaml(name):
    c = convert((GOLDEN / f"{name}.xml").read_bytes(), f"{name}.xml",
                path_exists=lambda p: True, pool_exists=lambda p: False)
    text = cli_libvirt.profile_text(c.profile(), c)
    golden = GOLDEN / f"{name}.yaml"
    if REGEN:
        golden.write_text(text)
        pytest.fail(f"rewrote {golden}; review it and run again without KVMRUN_REGEN_GOLDEN")
    assert text == golden.read_text()
    assert load(golden) == c.profile()          # the golden is itself a loadable profile


# ---------------------------------------------------------------- round trip and schema

PROFILES = sorted(ROOT.glob("profiles/*.yaml")) + sorted(
    (ROOT / "tests" / "unit" / "golden").glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_export_import_is_the_same_profile(path):
    original = store.pinned(load(path))
    c = convert(to_xml(original).encode(), "exported.xml", path_exists=lambda p: True,
                pool_exists=lambda p: True)
    assert c.losses == []
    back = c.profile()
    for field in records.fields(original):
        if field.compare:
            assert getattr(back, field.name) == getattr(original, field.name), field.name
    assert back == original


@pytest.mark.skipif(not (SCHEMA.exists() and shutil.which("xmllint")),
                    reason="libvirt's RelaxNG schema or xmllint is missing (.ci/install-deps "
                           "installs libvirt-clients and libxml2-utils)")
def test_exported_xml_is_valid_for_libvirt(tmp_path):
    files = []
    for path in PROFILES:
        target = tmp_path / f"{path.stem}.xml"
        target.write_text(to_xml(store.pinned(load(path))))
        files.append(str(target))
    done = subprocess.run(["xmllint", "--noout", "--relaxng", str(SCHEMA), *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def dirs(tmp_path, monkeypatch):
    for var in ("KVMRUN_CONFIG_DIR", "KVMRUN_DATA_DIR", "KVMRUN_RUN_DIR", "KVMRUN_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path


def run(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_import_defines_the_vm_and_copies_its_nvram(dirs, capsys):
    disk, vars_ = dirs / "web1.qcow2", dirs / "web1_VARS.fd"
    disk.write_bytes(b"")
    vars_.write_bytes(b"variables")
    xml = dirs / "web1.xml"
    xml.write_text(domain(f"<devices><disk type='file'><driver type='raw'/><source file='{disk}'"
                          "/><target dev='vda' bus='virtio'/></disk></devices>")
                   .replace("<name>vm</name>", "<name>web1</name>")
                   .replace("</os>", f"<loader type='pflash'/><nvram>{vars_}</nvram></os>"))
    code, out, _ = run(["import", str(xml)], capsys)
    assert code == 0, out
    assert "imported web1" in out
    nvram = dirs / "KVMRUN_DATA_DIR" / "nvram" / "web1_VARS.fd"
    assert nvram.read_bytes() == b"variables" and vars_.read_bytes() == b"variables"
    assert store.resolve("web1").disks[0].path == str(disk)
    defined = (dirs / "KVMRUN_CONFIG_DIR" / "vms" / "web1.yaml").read_text()
    assert defined.startswith(f"# converted from {xml} by kvmrun\n# approximated:\n")
    nvram.write_bytes(b"changed by the guest")
    code, out, _ = run(["import", str(xml)], capsys)       # the same VM again: nothing changes
    assert (code, nvram.read_bytes()) == (0, b"changed by the guest")
    assert "already defined" in out


def test_import_stops_on_losses_unless_lossy(dirs, capsys):
    xml = dirs / "vm.xml"
    xml.write_text(domain("<devices><watchdog model='i6300esb'/></devices>"))
    code, out, err = run(["import", str(xml)], capsys)
    assert code == 2 and out == ""
    assert err == (f"kvmrun: error: {xml}: 1 setting(s) of this domain have no kvmrun "
                   f"counterpart:\n  {xml}:1: devices/watchdog[0]: watchdog devices are not "
                   "supported\n  hint: --lossy converts it anyway, without them\n")
    code, out, err = run(["import", str(xml), "--print", "--lossy"], capsys)
    assert code == 0 and "#   devices/watchdog[0]: watchdog devices" in out and "name: vm" in out
    assert not (dirs / "KVMRUN_CONFIG_DIR" / "vms" / "vm.yaml").exists()
    code, out, err = run(["import", str(xml), "--lossy"], capsys)
    assert code == 0 and "kvmrun: lost: devices/watchdog[0]" in err


def test_convert_and_export_libvirt_round_trip_on_the_command_line(dirs, capsys):
    profile = dirs / "p.yaml"
    profile.write_text("name: p1\narch: x86_64\nmemory: 256\nnetwork: [{forward: [2222:22]}]\n")
    code, xml, _ = run(["export", str(profile), "--format", "libvirt"], capsys)
    assert code == 0 and xml.startswith("<domain ") and ' type="kvm"' in xml.splitlines()[0]
    (dirs / "p1.xml").write_text(xml)
    code, out, _ = run(["convert", str(dirs / "p1.xml"), "--json"], capsys)
    assert code == 0
    import json
    assert json.loads(out)["profile"] == store.export_dict(load(profile))
    code, _, err = run(["convert", str(dirs / "nope.xml")], capsys)
    assert (code, err) == (2, f"kvmrun: error: {dirs / 'nope.xml'}: file not found\n")


# ---------------------------------------------------------------- never a traceback

TAGS = ["domain", "name", "memory", "vcpu", "os", "type", "boot", "loader", "nvram", "kernel",
        "cpu", "model", "feature", "devices", "disk", "source", "target", "driver", "interface",
        "mac", "filesystem", "serial", "console", "channel", "graphics", "video", "rng",
        "backend", "input", "controller", "memballoon", "features", "acpi", "clock", "timer",
        "metadata", "backingStore", "on_reboot", "readonly", "numa", "cell", "qemu:arg"]
ATTRS = ["type", "dev", "bus", "file", "arch", "machine", "unit", "mode", "name", "model",
         "address", "order", "policy", "network", "bridge", "dir", "accessmode", "cache",
         "current", "memory", "firmware", "readonly", "pool", "volume", "value"]
VALUES = st.sampled_from(["", "kvm", "qemu", "x86_64", "hvm", "q35", "pc-q35-10.0", "virtio",
                          "ide", "sata", "scsi", "sd", "usb", "file", "block", "cdrom", "disk",
                          "user", "network", "bridge", "default", "vnc", "spice", "-1", "0",
                          "1", "GiB", "x", "/a", "<", "&amp;", "52:54:00:00:00:01", "efi",
                          "host-passthrough", "custom", "ppc", "1" * 30]) | st.text(max_size=8)


def _xml_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
            .replace(">", "&gt;"))


ELEMENTS = st.recursive(
    st.builds(lambda t, v: f"<{t}>{_xml_escape(v)}</{t}>", st.sampled_from(TAGS), VALUES),
    lambda inner: st.builds(
        lambda t, attrs, kids: (f"<{t}" + "".join(f" {k}='{_xml_escape(v)}'" for k, v in attrs)
                                + ">" + "".join(kids) + f"</{t}>"),
        st.sampled_from(TAGS), st.lists(st.tuples(st.sampled_from(ATTRS), VALUES), max_size=3,
                                        unique_by=lambda kv: kv[0]),
        st.lists(inner, max_size=4)),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.lists(ELEMENTS, max_size=6), kind=VALUES)
def test_generated_domains_never_give_a_traceback(body, kind):
    text = (f"<domain type='{_xml_escape(kind)}' xmlns:qemu='http://libvirt.org/schemas/"
            f"domain/qemu/1.0'>" + "".join(body) + "</domain>")
    try:
        c = conv(text)
        c.profile()
        cli_libvirt.comment_block(c)
    except ProfileError as e:
        assert str(e).startswith("vm.xml")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_never_give_a_traceback(raw):
    try:
        conv(raw).profile()
    except ProfileError as e:
        assert str(e).startswith("vm.xml")


@pytest.mark.skipif(not shutil.which("virsh"), reason="virsh is missing (.ci/install-deps "
                                                     "installs libvirt-clients)")
@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_libvirt_defines_the_export_and_its_dumpxml_imports_back(path, tmp_path):
    """`virsh define` (libvirt's own parser, on its in-process test:///default driver)
    accepts the export; what `virsh dumpxml` then gives, with libvirt's defaults filled in,
    imports back to the same profile."""
    original = store.pinned(load(path))
    xml = tmp_path / "vm.xml"
    xml.write_text(to_xml(original))
    done = subprocess.run(["virsh", "-q", "-c", "test:///default",
                           f"define {xml}; dumpxml {original.name}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dumped = done.stdout[done.stdout.index("<domain"):]
    c = convert(dumped.encode(), "dumped.xml", path_exists=lambda p: True,
                pool_exists=lambda p: True)
    assert [str(f) for f in c.losses] == []
    if "commandline" not in dumped:     # only the qemu driver keeps the qemu: namespace; the
        original = records.replace(original, qemu_args=())   # test driver drops it
    assert c.profile() == original
