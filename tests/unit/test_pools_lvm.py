"""LVM pools without a real volume group: the LVM commands (vgs, lvs, lvcreate, lvremove)
are a small fake on PATH that keeps its volume groups in a JSON file and answers with LVM's
own messages; LVM's device directory (/dev/VG/LV) is a temporary directory. The real thing
is tests/integration/test_storage_lvm.py."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pytest

from kvmrun.guest import rundir
from kvmrun.storage import disks, images, lvm as lvmmod, pools
from kvmrun.cli import main
from kvmrun.errors import HostError, ProfileError
from kvmrun.ops.defined import load       # a profile file as the host uses it (pools)

MiB = 1 << 20

FAKE_LVM = textwrap.dedent('''\
    import json, os, sys
    state_file = os.environ["FAKE_LVM_STATE"]
    state = json.load(open(state_file))
    cmd, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    log = state.setdefault("log", [])
    log.append([cmd, *args])
    def save():
        json.dump(state, open(state_file, "w"))
    def fail(msg, code=5):
        save(); sys.stderr.write("".join("  " + m + "\\n" for m in msg.splitlines())); sys.exit(code)
    def report(kind, rows):
        save(); print(json.dumps({"report": [{kind: rows}]})); sys.exit(0)
    def need_vg(vg):
        if vg not in state["vgs"]:
            fail(f'Volume group "{vg}" not found\\nCannot process volume group {vg}')
        return state["vgs"][vg]
    if state.get("no_dm") and cmd == "lvcreate":
        fail("/dev/mapper/control: open failed: No such device\\n"
             "Failure to communicate with kernel device-mapper driver.", 3)
    if cmd == "vgs":
        g = need_vg(args[-1]); used = sum(g["lvs"].values())
        report("vg", [{"vg_name": args[-1], "vg_size": str(g["size"]),
                       "vg_free": str(g["size"] - used), "vg_extent_size": str(4 << 20),
                       "lv_count": str(len(g["lvs"]))}])
    if cmd == "lvs":
        g = need_vg(args[-1])
        report("lv", [{"lv_name": n, "lv_size": str(s),
                       "lv_attr": "-wi-ao----" if n in state.get("open", []) else "-wi-a-----"}
                      for n, s in sorted(g["lvs"].items())])
    if cmd == "lvcreate":
        vg, name = args[-1], args[args.index("-n") + 1]
        size = -(-int(args[args.index("-L") + 1].rstrip("b")) // (4 << 20)) * (4 << 20)
        g = need_vg(vg)
        if name in g["lvs"]:
            fail(f'Logical Volume "{name}" already exists in volume group "{vg}"')
        if size > g["size"] - sum(g["lvs"].values()):
            fail(f'Volume group "{vg}" has insufficient free space (1 extents): 9 required.')
        g["lvs"][name] = size
        if not state.get("no_node"):
            os.makedirs(os.path.join(state["dev"], vg), exist_ok=True)
            open(os.path.join(state["dev"], vg, name), "w").close()
        save(); print(f'  Logical volume "{name}" created.'); sys.exit(0)
    if cmd == "lvremove":
        vg, name = args[-1].split("/")
        g = need_vg(vg)
        if name not in g["lvs"]:
            fail(f'Failed to find logical volume "{vg}/{name}"')
        if name in state.get("open", []):
            fail(f"Logical volume {vg}/{name} in use.")
        del g["lvs"][name]
        try:
            os.unlink(os.path.join(state["dev"], vg, name))
        except FileNotFoundError:
            pass
        save(); print(f'  Logical volume "{name}" successfully removed.'); sys.exit(0)
    fail(f"fake LVM: unexpected {cmd} {args}", 3)
''')


class FakeLVM:
    def __init__(self, tmp_path, monkeypatch):
        self.state_file = tmp_path / "lvm-state.json"
        self.dev = tmp_path / "dev"
        bindir = tmp_path / "lvm-bin"
        bindir.mkdir()
        script = bindir / "fake-lvm"
        script.write_text(f"#!{sys.executable}\n{FAKE_LVM}")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        for cmd in ("vgs", "lvs", "lvcreate", "lvremove"):
            (bindir / cmd).symlink_to(script)
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_LVM_STATE", str(self.state_file))
        monkeypatch.setattr(lvmmod, "DEV", str(self.dev))
        self.write({"vgs": {"vg0": {"size": 64 * MiB, "lvs": {}}}, "dev": str(self.dev)})

    def read(self) -> dict:
        return json.loads(self.state_file.read_text())

    def write(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state))

    def update(self, **changes) -> None:
        self.write({**self.read(), **changes})

    def lvs(self) -> dict:
        return self.read()["vgs"]["vg0"]["lvs"]

    def commands(self, name: str) -> list[list[str]]:
        return [c for c in self.read().get("log", []) if c[0] == name]


@pytest.fixture
def lvm(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    return FakeLVM(tmp_path, monkeypatch)


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_define_create_info_delete(lvm, tmp_path, capsys):
    code, out, _ = cli(capsys, "pool", "define", "fast", "--type", "lvm", "--vg", "vg0")
    assert (code, out) == (0, "defined pool fast on LVM volume group vg0\n")
    code, out, _ = cli(capsys, "disk", "create", "--pool", "fast", "web", "--size", "10M")
    assert (code, out) == (0, f"created {lvm.dev}/vg0/web (raw, 12 MiB)\n")   # 4 MiB extents
    assert lvm.lvs() == {"web": 12 * MiB}
    assert lvm.commands("lvcreate")[0][1:] == ["--yes", "--wipesignatures", "y",
                                               "-L", f"{10 * MiB}b", "-n", "web", "vg0"]
    code, out, _ = cli(capsys, "pool", "info", "fast")
    assert code == 0 and out == (
        "fast\n"
        f"  type     lvm (volume group vg0, volumes are {lvm.dev}/vg0/NAME)\n"
        "  space    52 MiB free of 64 MiB\n"
        "  volume   web  raw  12 MiB\n")
    info = json.loads(cli(capsys, "pool", "info", "fast", "--json")[1])
    assert (info["type"], info["vg"], info["capacity"], info["free"]) == (
        "lvm", "vg0", 64 * MiB, 52 * MiB)
    assert [(v["name"], v["path"], v["open"]) for v in info["volumes"]] == [
        ("web", f"{lvm.dev}/vg0/web", False)]
    code, out, _ = cli(capsys, "pool", "list")
    assert out.splitlines()[1].split() == ["fast", "lvm", "1", "52", "MiB", f"{lvm.dev}/vg0",
                                           "(VG", "vg0)"]

    # a profile names the volume: /dev/VG/VOLUME, raw
    prof = load(write(tmp_path, "arch: x86_64\ndisks: [{pool: fast, volume: web}]\n"))
    assert (prof.disks[0].path, prof.disks[0].format) == (f"{lvm.dev}/vg0/web", "raw")

    code, out, _ = cli(capsys, "disk", "delete", "--pool", "fast", "web")
    assert (code, out) == (0, f"deleted {lvm.dev}/vg0/web\n")
    assert lvm.lvs() == {} and not (lvm.dev / "vg0" / "web").exists()
    code, _, err = cli(capsys, "disk", "delete", "--pool", "fast", "web")
    assert code == 1 and "no volume 'web' in pool 'fast' (volume group vg0)" in err
    code, out, _ = cli(capsys, "pool", "undefine", "fast")
    assert out == "undefined pool fast (its volumes stay in volume group vg0)\n"


def test_create_errors_leave_nothing(lvm, capsys):
    cli(capsys, "pool", "define", "fast", "--type", "lvm", "--vg", "vg0")
    cli(capsys, "disk", "create", "--pool", "fast", "web", "--size", "8M")
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "web", "--size", "8M")
    assert code == 1 and "cannot create vg0/web: a logical volume of that name exists" in err
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "big", "--size", "1G")
    assert code == 1 and ("cannot create vg0/big: not enough free space in volume group vg0 "
                          "(1 GiB asked, 56 MiB free)") in err
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "q", "-s", "8M", "-f", "qcow2")
    assert code == 1 and "volumes of lvm pool 'fast' are raw logical volumes, not qcow2" in err
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "o", "-b", "/base.qcow2")
    assert code == 1 and "cannot be an overlay" in err
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "nosize")
    assert code == 1 and "give a size" in err

    # the device node never appears: the new volume is removed again
    lvm.update(no_node=True)
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "ghost", "--size", "4M")
    assert code == 1 and f"its device {lvm.dev}/vg0/ghost did not appear" in err
    assert [c[-1] for c in lvm.commands("lvremove")] == ["vg0/ghost"]
    # no device-mapper (a container): LVM's refusal, explained; nothing made
    lvm.update(no_node=False, no_dm=True)
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "nodm", "--size", "4M")
    assert code == 3 and "device-mapper is not available" in err and "modprobe dm_mod" in err
    assert lvm.lvs() == {"web": 8 * MiB}

    # the volume group went away after the pool was defined
    lvm.update(vgs={})
    code, _, err = cli(capsys, "disk", "create", "--pool", "fast", "x", "--size", "4M")
    assert code == 1 and "LVM volume group 'vg0' does not exist" in err and "vgs" in err
    code, _, err = cli(capsys, "pool", "info", "fast")
    assert code == 1 and "LVM volume group 'vg0' does not exist" in err
    rows = json.loads(cli(capsys, "pool", "list", "--json")[1])
    assert [(r["name"], r["available"], r["volumes"]) for r in rows] == [("fast", False, 0)]


def test_define_errors(lvm, tmp_path, capsys):
    code, _, err = cli(capsys, "pool", "define", "p", "--type", "lvm", "--vg", "nosuch")
    assert code == 1 and "LVM volume group 'nosuch' does not exist" in err
    code, _, err = cli(capsys, "pool", "define", "p", "--type", "lvm")
    assert code == 1 and "an lvm pool needs its volume group: --vg VGNAME" in err
    code, _, err = cli(capsys, "pool", "define", "p", tmp_path / "d", "--type", "lvm",
                       "--vg", "vg0")
    assert code == 1 and "an lvm pool has no directory" in err
    code, _, err = cli(capsys, "pool", "define", "p", "--type", "lvm", "--vg", "-bad")
    assert code != 0
    code, _, err = cli(capsys, "pool", "define", "p", "--vg", "vg0")
    assert code == 1 and "--vg is for lvm pools" in err
    code, _, err = cli(capsys, "pool", "define", "p", "--type", "zfs", "--vg", "vg0")
    assert code == 1 and "unknown pool type 'zfs'" in err
    code, _, err = cli(capsys, "pool", "define", "p")
    assert code == 1 and "a directory pool needs its DIRECTORY" in err
    assert pools.names() == []


def test_no_lvm_tools(lvm, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(lvmmod.proc, "which", lambda *a, **k: None)
    code, _, err = cli(capsys, "pool", "define", "p", "--type", "lvm", "--vg", "vg0")
    assert code == 3 and "LVM tools are not installed" in err and "apt-get install lvm2" in err


def test_profile_keys_on_lvm_pools(lvm, tmp_path, capsys):
    cli(capsys, "pool", "define", "fast", "--type", "lvm", "--vg", "vg0")
    prof = load(write(tmp_path, "arch: x86_64\ndisks: [{pool: fast, volume: a, format: raw, "
                                "ephemeral: true}]\n"))
    assert (prof.disks[0].format, prof.disks[0].ephemeral) == ("raw", True)
    for disk, message in [
        ("{pool: fast, volume: a, format: qcow2}",
         r"disks\[0\].format: a volume of lvm pool 'fast' is a raw logical volume, not qcow2"),
        ("{pool: fast, volume: a, size: 1G}",
         r"disks\[0\].size: lvm volumes are not made on first start"),
        ("{pool: fast, volume: a, backing: /b.qcow2}",
         r"disks\[0\].backing: a logical volume cannot be a qcow2 overlay"),
    ]:
        with pytest.raises(ProfileError, match=message):
            load(write(tmp_path, f"arch: x86_64\ndisks: [{disk}]\n"))


def test_delete_refused_while_in_use(lvm, tmp_path, capsys, monkeypatch):
    cli(capsys, "pool", "define", "fast", "--type", "lvm", "--vg", "vg0")
    cli(capsys, "disk", "create", "--pool", "fast", "web", "--size", "4M")
    path = f"{lvm.dev}/vg0/web"
    monkeypatch.setattr(rundir, "guest_using",
                        lambda p: ("webvm", 1, False) if p == path else None)
    code, _, err = cli(capsys, "disk", "delete", "--pool", "fast", "web")
    assert code == 4 and f"{path} is in use by running guest 'webvm' (disk1)" in err
    assert "kvmrun stop webvm" in err
    assert "in use by webvm" in cli(capsys, "pool", "info", "fast")[1]
    monkeypatch.setattr(rundir, "guest_using", lambda p: None)
    lvm.update(open=["web"])                       # open by some other program
    code, _, err = cli(capsys, "disk", "delete", "--pool", "fast", "web")
    assert code == 1 and "logical volume vg0/web is open" in err and "fuser" in err
    assert lvm.lvs() == {"web": 4 * MiB} and lvm.commands("lvremove") == []


def test_dir_pool_delete(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(tmp_path / "run"))
    cli(capsys, "pool", "define", "d", tmp_path / "images")
    cli(capsys, "disk", "create", "--pool", "d", "a.qcow2", "--size", "1M")
    image = tmp_path / "images" / "a.qcow2"
    monkeypatch.setattr(rundir, "guest_using",
                        lambda p: ("vm", 0, False) if p == str(image) else None)
    code, _, err = cli(capsys, "disk", "delete", "--pool", "d", "a.qcow2")
    assert code == 4 and "in use by running guest 'vm'" in err and image.exists()
    monkeypatch.setattr(rundir, "guest_using", lambda p: None)
    assert cli(capsys, "disk", "delete", "--pool", "d", "a.qcow2")[:2] == (
        0, f"deleted {image}\n")
    assert not image.exists()
    code, _, err = cli(capsys, "disk", "delete", "--pool", "d", "a.qcow2")
    assert code == 1 and "no volume 'a.qcow2' in pool 'd'" in err
    code, _, err = cli(capsys, "disk", "delete", "/dev/null")
    assert code == 1 and "/dev/null is not an image file" in err


@pytest.mark.parametrize("stderr,kind,message", [
    ('  Volume group "vg9" not found\n  Cannot process volume group vg9', "PoolError",
     "LVM volume group 'vg9' does not exist"),
    ('  Volume group "vg0" has insufficient free space (3 extents): 256 required.',
     "PoolError", "not enough free space in the volume group"),
    ('  Logical Volume "web" already exists in volume group "vg0"', "PoolError",
     "a logical volume of that name exists already"),
    ("  Logical volume vg0/web in use.", "PoolError", "the logical volume is in use"),
    ("  Logical volume vg0/web contains a filesystem in use.", "PoolError",
     "the logical volume is in use"),
    ("  /dev/mapper/control: open failed: No such device\n  Failure to communicate with "
     "kernel device-mapper driver.", "HostError", "device-mapper is not available"),
    ("  WARNING: Running as a non-root user. Functionality may be unavailable.\n"
     "  /run/lock/lvm/P_global:aux: open failed: Permission denied", "HostError",
     "LVM needs root"),
    ('  Names starting "snapshot" are reserved. Please choose a different LV name.',
     "PoolError", "LVM refuses the name"),
    ("  something new", "PoolError", "cannot create vg0/web: something new"),
])
def test_lvm_messages(stderr, kind, message):
    err = lvmmod.explain_lvm(stderr, "cannot create", "vg0/web")
    assert type(err).__name__ == kind and message in err.message
    assert isinstance(err, HostError) == (kind == "HostError")


def test_block_devices_are_raw_without_probing(tmp_path, monkeypatch):
    """A block device without format: is raw; qemu-img never probes it."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"QFI\xfb" + bytes(508))         # looks like qcow2 to a prober
    monkeypatch.setattr(images, "is_block_device", lambda p: p == str(image))
    monkeypatch.setattr(images, "image_info", lambda p: pytest.fail("probed " + p))
    prof = load(write(tmp_path, f"arch: x86_64\ndisks: [{{path: {image}}}]\n"))
    assert disks.with_formats(prof).disks[0].format == "raw"
    assert images.detect_format(str(image)) == "raw"
    assert images.is_block_device("/dev/null") is False          # a character device
