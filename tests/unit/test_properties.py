"""Property tests of the loader: whatever a user writes, loading a profile either gives a
Profile or raises a ProfileError that says where (the file and a line or key path, or the
`--set` that caused it) -- never another exception.

That generated *valid* profiles compile to command lines QEMU accepts is checked against the
real QEMU in tests/integration/test_oracle.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmrun.errors import ProfileError
from kvmrun.profile import load
from kvmrun.errors import ProfileErrors

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

VALID = {
    "name": "vm", "arch": "x86_64", "memory": "1G", "smp": 2, "boot": "dc",
    "kernel": {"path": "vmlinuz", "append": "console=ttyS0"},
    "disks": [{"path": "a.qcow2", "interface": "scsi", "cache": "none"},
              {"path": "b.img", "format": "raw", "readonly": True}],
    "cdrom": "install.iso",
    "network": [{"forward": ["2222:22"], "mac": "52:54:00:12:34:56"}],
    "devices": ["rng", "tablet"],
    "shutdown": {"method": "acpi", "timeout": 30},
    "ready": {"console": "login:"},
    "gdb": 1234,
    "qemu_args": ["-rtc", "base=utc"],
}

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "~", "~nobody/x", "2222:22", "1.5G", "-1", "0x10", ".nan", "yes",
                       "a,b", "virtio", "q35", "\x00", "Ω"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


def assert_located(err: ProfileError, file: str) -> None:
    for e in err.errors if isinstance(err, ProfileErrors) else [err]:
        loc = e.location
        if loc.file.startswith("--set "):
            continue                            # the assignment itself is the place
        assert loc.file == file, str(e)
        assert loc.line or loc.path or e.reason == "the file is empty", str(e)


def load_or_locate(path: Path, sets: list[str] = ()) -> None:
    try:
        load(path, sets)
    except ProfileError as err:
        assert_located(err, str(path))


def key_paths(node, prefix=()):
    """Every (path) into a nested mapping/list, the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from key_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from key_paths(value, prefix + (i,))


def replaced(data, path, value):
    if not path:
        return value
    copy = list(data) if isinstance(data, list) else dict(data)
    copy[path[0]] = replaced(data[path[0]], path[1:], value)
    return copy


def test_the_base_profile_is_valid(tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load(path).name == "vm"


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes(raw, tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_bytes(raw)
    load_or_locate(path)


YAMLISH = st.lists(st.sampled_from(list("abnemory:-[]{}&*!|>'\"#%@`,?\t 0129.GM\n")
                                   + ["name: vm\n", "disks:\n", "  - ", "    ", "extends: ",
                                      "vm.yaml", "\ufeff", "\x85", "\x00"]),
                   max_size=40).map("".join)


@FUZZ
@given(text=YAMLISH)
def test_yaml_like_text(text, tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    load_or_locate(path)


@FUZZ
@given(data=st.data())
def test_a_valid_profile_with_one_value_broken(data, tmp_path):
    where = data.draw(st.sampled_from(list(key_paths(VALID))), label="path")
    junk = data.draw(JUNK, label="value")
    broken = replaced(VALID, where, junk)
    if data.draw(st.booleans(), label="plus an unknown key") and isinstance(broken, dict):
        broken = {**broken, data.draw(st.text(min_size=1, max_size=8)): junk}
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(broken, allow_unicode=True))
    load_or_locate(path)


@FUZZ
@given(key=st.sampled_from(["memory", "smp", "disks.0.path", "disks.5.cache", "network.0",
                            "kernel", "name.x", "0", "", "a..b", "devices.-1", "qemu_args.0"])
       | st.text(max_size=10),
       value=st.text(max_size=12) | st.sampled_from(["[", "{a: *b}", "&a [*a]", "!!binary x",
                                                     "!!python/object:os.system ls"]),
       equals=st.booleans())
def test_any_set_assignment(key, value, equals, tmp_path):
    path = tmp_path / "vm.yaml"
    path.write_text(yaml.safe_dump(VALID))
    load_or_locate(path, [f"{key}={value}" if equals else key + value])
