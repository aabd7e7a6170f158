"""Hostile and odd input (issue 12, bugs 3, 6, 9, 13): every case the red-team pass found is
a located error with exit code 2 (or a plain one-line error), never an internal error,
never a hang, and never an echo of a huge value.

The CLI runs in-process; each case is one the red team reproduced.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrun import cli
from kvmrun.errors import ProfileError
from kvmrun.paths import RunPaths
from kvmrun.profile import load
from kvmrun.profile.yamlsrc import MAX_BYTES, MAX_DEPTH, MAX_VALUES, parse_yaml

NINES = "9" * 400


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("RUN", "CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"KVMRUN_{var}_DIR", str(tmp_path / var.lower()))
    Path("vm.yaml").write_text("name: vm\narch: x86_64\nmemory: 256\n")
    return tmp_path


def kvmrun(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def parse_error(raw: bytes) -> ProfileError:
    with pytest.raises(ProfileError) as err:
        parse_yaml(raw, "vm.yaml")
    return err.value


# ---------------------------------------------------------------- bug 6: billion laughs, size

def laughs(levels: int) -> bytes:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


def test_billion_laughs_stops_at_the_value_budget():
    err = parse_error(laughs(9))                      # 9**9 values if expanded
    assert f"expands to more than {MAX_VALUES} values" in str(err)
    assert err.location.line is not None and err.location.path


def test_a_few_aliases_are_fine():
    data, _ = parse_yaml(laughs(3), "vm.yaml")
    assert len(data["c"]) == 9 and data["c"][0][0] == ["x"] * 9


def test_a_profile_over_the_size_limit_is_refused_unparsed(capsys):
    Path("big.yaml").write_text("name: big\ndescription: '" + "x" * MAX_BYTES + "'\n")
    code, out, err = kvmrun(capsys, "validate", "big.yaml")
    assert code == 2 and "big.yaml: is larger than 64 KiB" in err
    assert "xxxx" not in err and "internal error" not in err


# ---------------------------------------------------------------- bug 9: odd YAML

@pytest.mark.parametrize("raw, message", [
    (b"memory: !!int abc\n", "vm.yaml:1: memory: 'abc': not a valid int"),
    (b"memory: !!float x\n", "vm.yaml:1: memory: 'x': not a valid float"),
    (b"memory: !!timestamp 2001-13-45\n", "could not determine a constructor"),
    (b"memory: " + b"9" * 4400 + b"\n", "too many digits"),
    (b"memory: " + b"[" * 50_000 + b"\n", f"nested more than {MAX_DEPTH} levels deep"),
    (b"".join(b"  " * i + b"a:\n" for i in range(200)),
     f"nested more than {MAX_DEPTH} levels deep"),
    (b"? [a]\n: 1\n", "a key must be a plain value"),
    (b"a: !!python/object/apply:os.system [true]\n", "is not supported here"),
    (b"a: !!python/object:os.system x\n", "could not determine a constructor"),
    (b"a: !!set {x, y}\n", "'!!set' is not supported here"),
])
def test_odd_yaml_is_a_located_error(raw, message):
    err = parse_error(raw)
    assert message in str(err)
    assert str(err).startswith("vm.yaml")


@pytest.mark.parametrize("args, message", [
    (["--set", f"memory={NINES}M"], "is out of range (16 MiB to 16 TiB)"),
    (["--set", "memory=" + "9" * 5000], "too many digits"),
    (["--set", "memory=" + "[" * 10_000], "nested more than 64 levels deep"),
    (["--set", "memory=!!int abc"], "'abc': not a valid int"),
    (["-m", f"{NINES}M"], "is out of range"),
    (["--set", "disks.0.path=/" + "x" * 300], "is longer than a path can be"),
    (["--set", "forwards=2222:22"], "unknown key"),
    (["--set", "network.0.forward=[\u0662\u0662\u0662\u0662:22]"], "is not a port forward"),
    (["--set", "network.0.forward=[2222:" + "2" * 5000 + "]"], "is not a port forward"),
])
def test_cmdline_numbers_are_located_errors(capsys, args, message):
    code, out, err = kvmrun(capsys, "cmdline", "vm.yaml", *args)
    assert code == 2, err
    assert message in err and "internal error" not in err
    assert len(err) < 600                            # a huge value is never echoed whole


@pytest.mark.parametrize("args, message", [
    (["disk", "create", "d.qcow2", "--size", f"{NINES}G"], "larger than qcow2 images"),
    (["disk", "create", "d.qcow2", "--size", "1e999"], "is not a disk size"),
    (["disk", "resize", "d.qcow2", "9" * 5000], "larger than qcow2 images"),
    (["disk", "create", "x" * 300 + ".qcow2", "--size", "1G"], "File name too long"),
])
def test_disk_sizes_and_long_names_are_plain_errors(capsys, args, message):
    code, out, err = kvmrun(capsys, *args)
    assert code == (1 if "File name" in message else 2) and message in err, err
    assert "internal error" not in err and len(err) < 600


def test_unicode_digits_in_a_forward_fail_validation_not_qemu():
    Path("fwd.yaml").write_text("name: fwd\nnetwork:\n  - forward: ['\u0662\u0662:22']\n")
    with pytest.raises(ProfileError, match="is not a port forward"):
        load("fwd.yaml")


# ---------------------------------------------------------------- bug 3: names enter once

@pytest.mark.parametrize("args", [
    ["start", "vm.yaml", "--name", "a,debug-threads=on"],
    ["run", "vm.yaml", "--name", "../escaped"],
    ["cmdline", "vm.yaml", "--name", "x/y"],
    ["cmdline", "vm.yaml", "--set", "name=a,debug-threads=on"],
    ["status", "../escaped"], ["stop", "a,b"], ["kill", "../x"], ["logs", "../x"],
    ["console", "../x"], ["wait", "../x", "--for", "running"], ["define", "vm.yaml", "--name", "../x"],
])
def test_every_name_is_validated_where_it_enters(capsys, env, args):
    code, out, err = kvmrun(capsys, *args)
    assert code == 2, err
    assert "is not a valid VM name" in err
    assert not (env / "escaped").exists() and not list(env.glob("run/*"))


def test_a_profile_name_is_validated(capsys):
    Path("bad.yaml").write_text("name: 'a,debug-threads=on'\nmemory: 256\n")
    code, out, err = kvmrun(capsys, "cmdline", "bad.yaml")
    assert code == 2 and "is not a valid VM name" in err


def test_run_paths_refuse_a_bad_name():
    with pytest.raises(Exception, match="not a valid VM name"):
        RunPaths.for_guest("../x")


# ---------------------------------------------------------------- bug 13: gdb, echoes

def test_gdb_true_is_a_private_unix_socket(capsys):
    code, out, err = kvmrun(capsys, "cmdline", "vm.yaml", "--gdb")
    assert code == 0, err
    assert "-gdb chardev:gdb0" in out and "gdb.sock" in out and "tcp:" not in out


def test_gdb_on_a_port_is_tcp(capsys):
    code, out, err = kvmrun(capsys, "cmdline", "vm.yaml", "--gdb", "4321")
    assert code == 0 and "-gdb tcp:127.0.0.1:4321" in out


def test_a_huge_value_is_not_echoed_whole(capsys):
    Path("long.yaml").write_text("name: long\narch: '" + "y" * 50_000 + "'\n")
    code, out, err = kvmrun(capsys, "validate", "long.yaml")
    assert code == 2 and "is not a known architecture" in err
    assert len(err) < 2000


# ---------------------------------------------------------------- confinement

def test_the_sandbox_is_on_by_default_and_relaxed_for_the_bridge_helper():
    from kvmrun.arch import HostFacts
    from kvmrun.qemu.compile import sandbox_option
    Path("br.yaml").write_text("name: br\narch: x86_64\nnetwork:\n  - type: bridge\n"
                               "    bridge: br0\n")
    plain = load("vm.yaml")
    assert sandbox_option(plain, HostFacts(machine="x86_64")) == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    bridged = load("br.yaml")
    assert "spawn=allow" in sandbox_option(bridged, HostFacts(machine="x86_64",
                                                              net_admin=False))
    assert "spawn=deny" in sandbox_option(bridged, HostFacts(machine="x86_64",
                                                             net_admin=True))


def test_sandbox_off_warns(capsys):
    code, out, err = kvmrun(capsys, "cmdline", "vm.yaml", "--set", "sandbox=false")
    assert code == 0 and "-sandbox" not in out
    assert "without its seccomp sandbox" in err


def test_runas_only_where_no_feature_needs_root_paths():
    from kvmrun.arch import HostFacts
    from kvmrun.qemu.compile import runas_user, sandbox_option, stays_root
    host = HostFacts(machine="x86_64", qemu_user="kvmrun")
    plain = load("vm.yaml")
    assert runas_user(plain, host) == "kvmrun"
    assert "elevateprivileges=allow" in sandbox_option(plain, host)
    Path("iso.yaml").write_text("name: iso\narch: x86_64\nnetwork:\n  - type: isolated\n"
                                "    name: lab\n")
    assert runas_user(load("iso.yaml"), host) is None
    assert runas_user(plain, HostFacts(machine="x86_64")) is None
    assert stays_root(load("iso.yaml")) == "an isolated network's hub is reached by path"
    assert stays_root(plain) is None
    Path("pxe.yaml").write_text("name: pxe\narch: x86_64\nnetwork:\n  - tftp: .\n")
    assert stays_root(load("pxe.yaml")) == "the TFTP directory is read by path as root"


def test_runas_spelling_follows_the_qemu_version():
    """QEMU 7.2 has -runas; 9.1 deprecated it for -run-with user= (HostFacts.run_with,
    probed from `qemu -help`)."""
    from kvmrun.arch import HostFacts
    from kvmrun.paths import RunPaths
    from kvmrun.qemu.compile import build
    paths = RunPaths(Path("/run/kvmrun/vm"))
    old = build(load("vm.yaml"), HostFacts(machine="x86_64", qemu_user="kvmrun"), paths)
    new = build(load("vm.yaml"), HostFacts(machine="x86_64", qemu_user="kvmrun",
                                           run_with=True), paths)
    assert old.argv[old.argv.index("-runas") + 1] == "kvmrun" and "-run-with" not in old.argv
    assert new.argv[new.argv.index("-run-with") + 1] == "user=kvmrun"
    assert "-runas" not in new.argv and new.qemu_user == old.qemu_user == "kvmrun"


def test_qemu_user_defaults_to_kvmrun_as_root(monkeypatch):
    from kvmrun.errors import HostError
    from kvmrun.qemu import host
    monkeypatch.setattr(host.os, "geteuid", lambda: 0)
    monkeypatch.delenv("KVMRUN_QEMU_USER", raising=False)
    assert host.qemu_user() == "kvmrun"            # made on demand at the first start
    monkeypatch.setenv("KVMRUN_QEMU_USER", "root")
    assert host.qemu_user() is None
    monkeypatch.setenv("KVMRUN_QEMU_USER", "nobody")
    assert host.qemu_user() == "nobody"
    monkeypatch.setenv("KVMRUN_QEMU_USER", "sync-to-root-0")
    with pytest.raises(HostError, match="no such user"):
        host.qemu_user()
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    assert host.qemu_user() is None                # not root: QEMU runs as the caller


def test_status_says_why_root_qemu_keeps_root(monkeypatch):
    from kvmrun.arch import HostFacts
    from kvmrun.ops import launch
    from kvmrun.paths import RunPaths
    from kvmrun.qemu.compile import build
    monkeypatch.setattr(launch.os, "geteuid", lambda: 0)
    paths = RunPaths(Path("/run/kvmrun/vm"))
    plain = load("vm.yaml")
    dropped = build(plain, HostFacts(machine="x86_64", qemu_user="kvmrun"), paths)
    assert launch._qemu_user(plain, dropped) == {"qemu_user": "kvmrun", "qemu_user_why": None}
    kept = build(plain, HostFacts(machine="x86_64"), paths)          # KVMRUN_QEMU_USER=root
    assert launch._qemu_user(plain, kept) == {"qemu_user": "root",
                                              "qemu_user_why": "KVMRUN_QEMU_USER=root"}
    Path("iso.yaml").write_text("name: iso\narch: x86_64\nnetwork:\n  - type: isolated\n"
                                "    name: lab\n")
    iso = load("iso.yaml")
    why = launch._qemu_user(iso, build(iso, HostFacts(machine="x86_64", qemu_user="kvmrun"),
                                       paths))["qemu_user_why"]
    assert why == "an isolated network's hub is reached by path"
