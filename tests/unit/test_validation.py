"""Profile errors a user sees, pinned as exact text; `--set`, `extends`, sizes, forwards and
`kvmrun schema`.

Every message names the file, the key path and the line (`vm.yaml:2: memroy: …`). Profiles are
written into a temporary directory that is also the working directory, so the file shows up
as `vm.yaml` in messages.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvmrun import proc
from kvmrun.qemu import checks, host
from kvmrun.cli import main
from kvmrun.errors import ProfileError
from kvmrun.profile import DISK, PROFILE, json_schema, load, to_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVMRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


def write(name: str, content: str | bytes) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def error_of(content: str | bytes, sets: list[str] = (), name: str = "vm.yaml") -> str:
    write(name, content)
    with pytest.raises(ProfileError) as err:
        load(name, sets)
    return str(err.value)


# ---------------------------------------------------------------- pinned messages

KNOWN_KEYS = "known keys: " + ", ".join(PROFILE.fields)


@pytest.mark.parametrize("content, message", [
    pytest.param("name: vm\nmemroy: 2G\n",
                 f"vm.yaml:2: memroy: unknown key (did you mean 'memory'?)\n  hint: {KNOWN_KEYS}",
                 id="unknown key"),
    pytest.param("name: vm\ndisks:\n  - path: a.img\n    readonyl: true\n",
                 "vm.yaml:4: disks[0].readonyl: unknown key (did you mean 'readonly'?)\n"
                 "  hint: known keys: " + ", ".join(DISK.fields),
                 id="unknown nested key"),
    pytest.param("name: vm\ndisks:\n  - path: a.img\n    interface: virtoi\n",
                 "vm.yaml:4: disks[0].interface: 'virtoi' is not one of virtio, ide, scsi, "
                 "nvme, sd (did you mean 'virtio'?)",
                 id="bad enum"),
    pytest.param("name: vm\nmemory: 2X\n",
                 "vm.yaml:2: memory: '2X' is not a size\n"
                 "  hint: use MiB as a number (2048) or a size with a unit: 512M, 2G",
                 id="bad size"),
    pytest.param("name: vm\nmemory: 0.3M\n",
                 "vm.yaml:2: memory: '0.3M' is not a whole number of MiB", id="fractional MiB"),
    pytest.param("name: vm\nmemory: 8M\n",
                 "vm.yaml:2: memory: '8M' is out of range (16 MiB to 16 TiB)", id="small memory"),
    pytest.param("name: vm\nsmp: 0\n",
                 "vm.yaml:2: smp: 0 is out of range (1 to 1024)", id="smp zero"),
    pytest.param("name: vm\nsmp: 2000\n",
                 "vm.yaml:2: smp: 2000 is out of range (1 to 1024)", id="smp too many"),
    pytest.param("name: vm\nsmp: two\n",
                 "vm.yaml:2: smp: expected a whole number, found 'two'", id="smp not a number"),
    pytest.param("name: vm\nmemory: 1G\nmemory: 2G\n",
                 "vm.yaml:3: memory: duplicate key (first set on line 2)", id="duplicate key"),
    pytest.param("name: vm\ndisks:\n\t- path: a.img\n",
                 "vm.yaml:3: tab character in indentation\n"
                 "  hint: YAML indents with spaces only", id="tabs"),
    pytest.param(b"name: vm\ndescription: caf\xe9\n",
                 "vm.yaml:2: not valid UTF-8 (byte 0xe9)\n  hint: save the file as UTF-8",
                 id="non-UTF-8"),
    pytest.param("", "vm.yaml: the file is empty\n"
                     "  hint: a profile needs at least `name:` and usually `memory:`",
                 id="empty file"),
    pytest.param("- name: vm\n",
                 "vm.yaml:1: a profile must be a mapping of keys, found a list",
                 id="top level list"),
    pytest.param("just some text\n",
                 "vm.yaml:1: a profile must be a mapping of keys, found a string",
                 id="top level scalar"),
    pytest.param("name: vm\nk: &x {a: *x}\n",
                 "vm.yaml:2: k.a: an alias refers to a value that contains it",
                 id="alias loop"),
    pytest.param("name: my vm\n",
                 "vm.yaml:1: name: 'my vm' is not a valid VM name (letters, digits and . _ - "
                 "between them)", id="bad name"),
    pytest.param("name: vm\nnetwork:\n  - forward: 70000:22\n",
                 "vm.yaml:3: network[0].forward[0]: port 70000 is out of range (1 to 65535)",
                 id="forward port"),
    pytest.param("name: vm\narch: x86_64\nsemihosting: true\n",
                 "vm.yaml:3: semihosting: semihosting is not available for x86_64 guests\n"
                 "  hint: QEMU offers it for aarch64, arm, riscv64, riscv32",
                 id="semihosting on x86"),
    pytest.param("name: vm\narch: x86_64\nmachine: pc\nfirmware: uefi-secure\n",
                 "vm.yaml:3: machine: Secure Boot needs the q35 machine, not pc: OVMF's Secure "
                 "Boot build keeps the UEFI variables in SMM, which it supports on q35 only\n"
                 "  hint: machine: q35 (or leave machine out)", id="secure boot on pc"),
    pytest.param("name: vm\narch: x86_64\nsecure_boot: true\n",
                 "vm.yaml:3: secure_boot: Secure Boot needs UEFI firmware\n"
                 "  hint: firmware: uefi-secure (or firmware: uefi with secure_boot: true)",
                 id="secure boot without uefi"),
    pytest.param("name: vm\narch: riscv64\nfirmware: uefi-secure\n",
                 "vm.yaml:3: firmware: Secure Boot is not available for riscv64 guests\n"
                 "  hint: kvmrun offers it for x86_64, aarch64", id="secure boot on riscv64"),
    pytest.param("name: vm\narch: x86_64\nfirmware: uefi-secure\nsecure_boot: false\n",
                 "vm.yaml:4: secure_boot: firmware: uefi-secure is UEFI with Secure Boot: "
                 "secure_boot: false contradicts it\n"
                 "  hint: firmware: uefi for UEFI without Secure Boot",
                 id="secure boot contradicted"),
    pytest.param("name: vm\ndisks:\n  - path: a.img\n    interface: ide\n    readonly: true\n",
                 "vm.yaml:5: disks[0].readonly: an IDE disk cannot be read-only\n"
                 "  hint: use interface virtio, scsi or nvme for a read-only disk",
                 id="read-only IDE"),
    pytest.param("name: vm\nboot: cc\n", "vm.yaml:2: boot: 'cc' names a device twice",
                 id="boot twice"),
    pytest.param("name: vm\ncdrom: ~nosuchuser/x.iso\n",
                 "vm.yaml:2: cdrom: '~nosuchuser/x.iso' names an unknown user's home directory",
                 id="unknown user"),
    pytest.param('name: vm\nkernel:\n  path: vmlinuz\n  append: "a\\0b"\n',
                 "vm.yaml:4: kernel.append: 'a\\x00b' contains a NUL character", id="NUL"),
    pytest.param("name: vm\n\x00\n",
                 "vm.yaml:2: invalid YAML: the character U+0000 is not allowed",
                 id="control character"),
    pytest.param("name: vm\nshares:\n  - {path: d, tag: d, type: virtio-fs}\n",
                 "vm.yaml:3: shares[0].type: 'virtio-fs' is not one of 9p, virtiofs (did you "
                 "mean 'virtiofs'?)", id="bad share type"),
    pytest.param("name: vm\nshares:\n  - path: d\n    tag: d\n    type: virtiofs\n"
                 "    readonly: true\n",
                 "vm.yaml:6: shares[0].readonly: a virtiofs share cannot be read-only here "
                 "(QEMU 7.2's virtiofsd has no read-only mode)\n  hint: use type: 9p for a "
                 "read-only share, or mount it read-only in the guest (mount -t virtiofs -o ro "
                 "TAG /mnt)", id="read-only virtiofs"),
    pytest.param("name: vm\nshares:\n  - path: d\n    tag: d\n    type: virtiofs\n"
                 "    security_model: passthrough\n",
                 "vm.yaml:6: shares[0].security_model: security_model is for type: 9p, not "
                 "type: virtiofs", id="security_model on virtiofs"),
    pytest.param("name: vm\ntpm: yes please\n",
                 "vm.yaml:2: tpm: expected true or false, found 'yes please'", id="tpm not bool"),
    pytest.param("name: vm\narch: riscv64\ntpm: true\n",
                 "vm.yaml:3: tpm: kvmrun offers no TPM for riscv64 guests\n"
                 "  hint: TPM 2.0 is there for x86_64, i386, aarch64, arm", id="tpm on riscv"),
    pytest.param("name: vm\narch: arm\nmachine: vexpress-a9\ntpm: true\n",
                 "vm.yaml:4: tpm: the vexpress-a9 machine has no place for a TPM "
                 "(tpm-tis-device)\n  hint: use the virt machine", id="tpm on vexpress"),
])
def test_message(content, message):
    assert error_of(content) == message


def test_uefi_secure_is_uefi_with_secure_boot():
    """One spelling in the model: `firmware: uefi-secure` loads as the written-out form, on
    q35 however it is named, and `to_dict` gives a profile that loads back equal."""
    short = load(write("a.yaml", "name: vm\narch: x86_64\nfirmware: uefi-secure\n"))
    long = load(write("b.yaml", "name: vm\narch: x86_64\nmachine: q35\nfirmware: uefi\n"
                                "secure_boot: true\n"))
    assert (short.firmware, short.secure_boot) == ("uefi", True)
    assert (long.firmware, long.secure_boot) == ("uefi", True)
    assert to_dict(short)["secure_boot"] is True
    assert load(write("c.yaml", yaml.safe_dump(to_dict(short)))) == short
    assert load(write("d.yaml", "name: vm\narch: x86_64\nmachine: pc-q35-7.2\n"),
                ["firmware=uefi-secure"]).secure_boot
def test_missing_helpers_are_located_errors_of_the_host_checks(monkeypatch):
    """virtiofsd and swtpm are checked by validate/start, at the key that needs them."""
    monkeypatch.setattr(host, "qemu_binary", lambda arch: "/usr/bin/qemu-system-x86_64")
    monkeypatch.setattr(host, "virtiofsd_binary", lambda: None)
    monkeypatch.setattr(proc, "which", lambda program: None)
    write("d/keep", "")
    profile = load(write("vm.yaml", "name: vm\nshares:\n  - {path: d, tag: d, type: virtiofs}"
                                    "\ntpm: true\n"))
    assert [str(e) for e in checks.helper_errors(profile)] == [
        "vm.yaml:3: shares[0].type: virtiofs shares need virtiofsd, which is not installed\n"
        "  hint: install qemu-system-common (Debian 12: /usr/lib/qemu/virtiofsd) or "
        "virtiofsd, or use type: 9p",
        "vm.yaml:4: tpm: tpm: true needs swtpm, which is not installed\n"
        "  hint: install it: apt-get install swtpm swtpm-tools",
        "vm.yaml:4: tpm: tpm: true needs swtpm_setup, which is not installed\n"
        "  hint: install it: apt-get install swtpm swtpm-tools"]


def test_all_errors_of_a_file_are_reported_at_once():
    assert error_of("name: vm\nsmp: 0\nmemory: 2X\ndisplay: vga\n") == (
        "vm.yaml:2: smp: 0 is out of range (1 to 1024)\n"
        "vm.yaml:3: memory: '2X' is not a size\n"
        "  hint: use MiB as a number (2048) or a size with a unit: 512M, 2G\n"
        "vm.yaml:4: display: 'vga' is not one of none, vnc, gtk, sdl, spice")


def test_extends_loop():
    write("a.yaml", "extends: b.yaml\nmemory: 1G\n")
    write("b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError) as err:
        load("a.yaml")
    assert str(err.value) == (f"{Path('b.yaml').resolve()}:1: extends: "
                              "extends loop: a.yaml -> b.yaml -> a.yaml")


def test_base_that_is_a_directory():
    Path("base").mkdir()
    assert error_of("extends: base\n") == (
        f"vm.yaml:1: extends: base profile '{Path('base').resolve()}' is not a file")


def test_missing_base():
    assert error_of("extends: nowhere.yaml\n") == (
        f"vm.yaml:1: extends: base profile '{Path('nowhere.yaml').resolve()}' not found")


@pytest.mark.parametrize("assignment, message", [
    ("disks.3.path=x.img", "--set disks.3.path=x.img: disks[3]: no item 3 in a list of 1"),
    ("0=x", "--set 0=x: [0]: not a list, cannot index it with a number"),
    ("memory", "--set memory: expected KEY=VALUE, e.g. memory=4G or disks.0.cache=unsafe"),
    ("disks.0.interface=floppy", "--set disks.0.interface=floppy: disks[0].interface: "
                                 "'floppy' is not one of virtio, ide, scsi, nvme, sd"),
    ("memroy=2G", "--set memroy=2G: memroy: unknown key (did you mean 'memory'?)\n"
                  f"  hint: {KNOWN_KEYS}"),
])
def test_set_errors(assignment, message):
    assert error_of("name: vm\ndisks:\n  - path: a.img\n", [assignment]) == message


# ---------------------------------------------------------------- checks that ask QEMU

QEMU_X86 = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU_X86 is None, reason="qemu-system-x86_64 not installed")


@needs_qemu
def test_missing_disk_file_is_reported_by_checks():
    write("vm.yaml", "name: vm\narch: x86_64\ndisks:\n  - path: missing.img\n")
    with pytest.raises(ProfileError) as err:
        checks.check(load("vm.yaml"))
    assert str(err.value) == (f"vm.yaml:4: disks[0].path: disk "
                              f"'{Path('missing.img').resolve()}' not found")


@needs_qemu
def test_unknown_machine_and_cpu_get_close_matches_from_qemu():
    write("vm.yaml", "name: vm\narch: x86_64\nmachine: q53\ncpu: Skylake-Clinet,+avx\n")
    with pytest.raises(ProfileError) as err:
        checks.check(load("vm.yaml"))
    assert str(err.value) == (
        f"vm.yaml:3: machine: machine type 'q53' is not known to {QEMU_X86} "
        f"(close matches: q35)\n"
        f"  hint: list them with: {QEMU_X86} -machine help\n"
        f"vm.yaml:4: cpu: CPU model 'Skylake-Clinet' is not known to {QEMU_X86} "
        f"(close matches: Skylake-Client, Skylake-Client-v4, Skylake-Client-v3)\n"
        f"  hint: list them with: {QEMU_X86} -cpu help")


@needs_qemu
def test_known_machine_alias_and_cpu_pass_checks():
    write("vm.yaml", "name: vm\narch: x86_64\nmachine: pc-q35-7.2\ncpu: qemu64,+ssse3\n")
    checks.check(load("vm.yaml"))
    assert "q35" in host.qemu_machines(QEMU_X86)


# ---------------------------------------------------------------- kvmrun validate

def run_kvmrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmrun", *args], capture_output=True,
                          text=True, timeout=120)


def test_validate_exits_2_with_the_message_and_no_traceback():
    write("vm.yaml", "name: vm\nsmp: 0\n")
    done = run_kvmrun("validate", "vm.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", "vm.yaml:2: smp: 0 is out of range (1 to 1024)\n")


def test_validate_of_a_missing_file():
    done = run_kvmrun("validate", "nothere.yaml")
    assert (done.returncode, done.stderr) == (2, "nothere.yaml: file not found\n")


@pytest.mark.parametrize("content", [b"\xff\xfe", "a: &x [*x]\n", "- 1\n", "name: [\n"],
                         ids=["bytes", "alias loop", "list", "broken YAML"])
def test_validate_never_prints_a_traceback(content):
    write("vm.yaml", content)
    done = run_kvmrun("validate", "vm.yaml")
    assert done.returncode == 2
    assert done.stderr.startswith("vm.yaml:")
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


@needs_qemu
def test_validate_of_a_good_profile_exits_0(capsys):
    write("img/test.img", b"")
    write("vm.yaml", "name: vm\narch: x86_64\ndisks:\n  - path: img/test.img\n")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "vm.yaml"])
    assert (exit_.value.code, capsys.readouterr().out) == (0, "vm.yaml: ok\n")


def test_validate_json_lists_every_error(capsys):
    write("vm.yaml", "name: vm\nsmp: 0\nmemroy: 1G\n")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--json", "vm.yaml"])
    assert exit_.value.code == 2
    [result] = json.loads(capsys.readouterr().out)
    assert [(e["line"], e["key"]) for e in result["errors"]] == [(2, "smp"), (3, "memroy")]


# ---------------------------------------------------------------- --set

def test_set_overrides_values_parsed_as_yaml(in_tmp):
    write("vm.yaml", "name: vm\nmemory: 1G\ndisks:\n  - path: a.img\n")
    p = load("vm.yaml", ["memory=4G", "disks.0.cache=unsafe", "disks.1.path=b.img",
                         "halted=true", "devices=[rng, tablet]", "network.0.forward=2222:22",
                         "smp=2"])
    assert p.memory == 4096 and p.smp == 2 and p.halted is True
    assert p.devices == ("rng", "tablet")
    assert [(d.path, d.cache) for d in p.disks] == [(str(in_tmp / "a.img"), "unsafe"),
                                                    (str(in_tmp / "b.img"), None)]
    assert p.network[0].forward == ("tcp:127.0.0.1:2222-:22",)


def test_set_paths_resolve_against_the_working_directory(in_tmp, monkeypatch):
    write("profiles/vm.yaml", "name: vm\nkernel:\n  path: vmlinuz\n")
    p = load("profiles/vm.yaml", ["kernel.initrd=initrd.img"])
    assert p.kernel.path == str(in_tmp / "profiles" / "vmlinuz")
    assert p.kernel.initrd == str(in_tmp / "initrd.img")


def test_set_empty_value_unsets_a_key():
    write("vm.yaml", "name: vm\ncpu: qemu64\n")
    assert load("vm.yaml", ["cpu="]).cpu is None


# ---------------------------------------------------------------- extends

def test_extends(in_tmp):
    write("base/base.yaml", "name: base-vm\nmemory: 512\nsmp: 2\n"
                            "kernel:\n  path: vmlinuz\n  append: quiet\n"
                            "disks:\n  - path: base.qcow2\n  - path: data.qcow2\n"
                            "devices: [rng, balloon]\n")
    write("vms/web.yaml", "extends: ../base/base.yaml\nmemory: 1G\n"
                          "kernel:\n  append: console=ttyS0\n"
                          "disks:\n  - path: own.qcow2\n")
    p = load("vms/web.yaml")
    assert p.name == "web", "a name is never inherited"
    assert (p.memory, p.smp, p.devices) == (1024, 2, ("rng", "balloon"))
    assert p.kernel.path == str(in_tmp / "base" / "vmlinuz"), "base paths: base's directory"
    assert p.kernel.append == "console=ttyS0", "mappings merge key by key"
    assert [d.path for d in p.disks] == [str(in_tmp / "vms" / "own.qcow2")], "lists replace"


def test_extends_chain_and_errors_point_at_the_file_that_set_the_value(in_tmp):
    write("a.yaml", "smp: 0\n")
    write("b.yaml", "extends: a.yaml\nmemory: 256\n")
    write("c.yaml", "extends: b.yaml\n")
    with pytest.raises(ProfileError) as err:
        load("c.yaml")
    assert str(err.value) == f"{in_tmp / 'a.yaml'}:1: smp: 0 is out of range (1 to 1024)"


# ---------------------------------------------------------------- sizes and forwards

@pytest.mark.parametrize("size, mib", [(512, 512), ("512", 512), ("512M", 512), ("2G", 2048),
                                       ("1.5G", 1536), ("2GiB", 2048), ("2gb", 2048),
                                       ("1T", 1024 * 1024), ("65536K", 64)])
def test_sizes(size, mib):
    write("vm.yaml", f"name: vm\nmemory: {size}\n")
    assert load("vm.yaml").memory == mib


@pytest.mark.parametrize("written, normal", [
    ("2222:22", "tcp:127.0.0.1:2222-:22"),
    ("2222-22", "tcp:127.0.0.1:2222-:22"),
    ("tcp::2222-:22", "tcp:127.0.0.1:2222-:22"),
    ("udp:0.0.0.0:5353-:53", "udp:0.0.0.0:5353-:53"),
    ("tcp:127.0.0.1:8443-10.0.2.15:443", "tcp:127.0.0.1:8443-10.0.2.15:443"),
    (" 8080:80 ", "tcp:127.0.0.1:8080-:80"),
])
def test_forwards_are_normalised_to_qemu_hostfwd(written, normal):
    write("vm.yaml", f"name: vm\nnetwork:\n  - forward: '{written}'\n")
    assert load("vm.yaml").network[0].forward == (normal,)


def test_a_single_forward_may_be_written_without_a_list():
    write("vm.yaml", "name: vm\nnetwork:\n  - forward: 2222:22\n  - forward: [1:2, 3:4]\n")
    assert [n.forward for n in load("vm.yaml").network] == [
        ("tcp:127.0.0.1:2222-:22",), ("tcp:127.0.0.1:1-:2", "tcp:127.0.0.1:3-:4")]


# ---------------------------------------------------------------- kvmrun schema

KEYWORDS = {"$schema", "title", "description", "default", "type", "enum", "pattern",
            "minLength", "maxLength", "minimum", "maximum", "anyOf", "properties",
            "additionalProperties", "required", "items"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}


def schema_errors(schema: dict, value, where: str = "") -> list[str]:
    """A validator for the JSON Schema subset `kvmrun schema` uses (jsonschema is not a
    dependency); `test_schema_uses_only_the_subset` keeps the two in step."""
    if "anyOf" in schema:
        if all(schema_errors(option, value, where) for option in schema["anyOf"]):
            return [f"{where}: matches no option"]
        return []
    kind = schema.get("type")
    if kind and not (isinstance(value, TYPES[kind])
                     and not (kind == "integer" and isinstance(value, bool))):
        return [f"{where}: not {kind}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: not in enum")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{where}: does not match {schema['pattern']}")
    if isinstance(value, str) and not (schema.get("minLength", 0) <= len(value)
                                       <= schema.get("maxLength", len(value))):
        problems.append(f"{where}: wrong length")
    if isinstance(value, int) and not (schema.get("minimum", value) <= value
                                       <= schema.get("maximum", value)):
        problems.append(f"{where}: out of range")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                problems += schema_errors(props[key], item, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}.{key}: not allowed")
        problems += [f"{where}.{key}: required" for key in schema.get("required", [])
                     if key not in value]
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_errors(schema["items"], item, f"{where}[{i}]")
    return problems


def kvmrun_schema(capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main(["schema"])
    assert exit_.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_schema_is_the_profile_table(capsys):
    schema = kvmrun_schema(capsys)
    assert schema == json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert list(schema["properties"]) == list(PROFILE.fields)
    assert schema["required"] == ["name"]


def test_schema_uses_only_the_subset(capsys):
    def walk(node):
        if isinstance(node, dict):
            props = node.get("properties", {})
            assert set(node) <= KEYWORDS, set(node) - KEYWORDS
            for key, value in node.items():
                if key == "properties":
                    for sub in props.values():
                        walk(sub)
                elif key not in ("enum", "default", "required"):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(kvmrun_schema(capsys))


@pytest.mark.parametrize("profile_file", sorted((ROOT / "profiles").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_schema_accepts_every_shipped_profile(profile_file, capsys):
    from kvmrun.profile.yamlsrc import load_yaml
    data, _ = load_yaml(profile_file)
    data.setdefault("name", profile_file.stem)        # the loader's default
    assert schema_errors(kvmrun_schema(capsys), data) == []


def test_schema_rejects_what_the_loader_rejects(capsys):
    schema = kvmrun_schema(capsys)
    assert schema_errors(schema, {"name": "vm", "memroy": "2G"}) == [".memroy: not allowed"]
    assert schema_errors(schema, {"name": "vm", "memory": "2X"}) == [".memory: matches no option"]
    assert schema_errors(schema, {"name": "vm", "smp": 0}) == [".smp: out of range"]


# ---------------------------------------------------------------- what only QEMU refused before

def test_more_ide_devices_than_the_machine_has_slots(capsys):
    """Found when the profile is loaded, so `validate` refuses what `start` would."""
    disks = "".join(f"  - path: d{i}.img\n    interface: ide\n" for i in range(4))
    write("vm.yaml", f"name: vm\narch: x86_64\nmachine: pc\ndisks:\n{disks}cdrom: x.iso\n")
    with pytest.raises(ProfileError) as err:
        load("vm.yaml")
    assert str(err.value) == ("vm.yaml:13: cdrom: more IDE devices than the pc machine has "
                              "slots for (4)\n"
                              "  hint: use interface: virtio (or scsi) for the other disks")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "vm.yaml"])
    assert exit_.value.code == 2 and "more IDE devices" in capsys.readouterr().err
    write("q35.yaml", f"name: vm\narch: x86_64\ndisks:\n{disks}cdrom: x.iso\n")
    assert len(load("q35.yaml").disks) == 4       # q35 has six AHCI ports
