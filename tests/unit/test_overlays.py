"""A backing-file overlay kvmrun made and that is gone is an error at validate and start, not
a silent re-creation (real qemu-img; the record lives in the test's own data directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmrun.cli import main
from kvmrun.storage import disks as storage
from kvmrun.storage import overlays
from kvmrun.profile import load

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.fixture
def vm(tmp_path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"),
                    "16M"], check=True)
    profile = tmp_path / "vm.yaml"
    profile.write_text("name: vm\narch: x86_64\n"
                       "disks:\n  - {path: vm.qcow2, backing: base.qcow2}\n")
    return profile


def test_first_start_makes_the_overlay_and_a_lost_one_is_an_error(vm, tmp_path, capsys):
    p = load(vm)
    assert overlays.lost(p) == []                    # never made: it will be created
    assert storage.ensure_disks(p) == [str(tmp_path / "vm.qcow2")]
    assert overlays.lost(p) == []                    # there
    os.unlink(tmp_path / "vm.qcow2")
    [error] = overlays.lost(p)
    assert str(error).startswith(f"{vm}:4: disks[0].path: the overlay {tmp_path}/vm.qcow2 "
                                 f"(made by kvmrun on ")
    assert "is gone; starting would make it again, empty" in str(error)
    assert error.hint == (f"restore the file; or, to start afresh from the base, make a new "
                          f"overlay: kvmrun disk create {tmp_path}/vm.qcow2 --backing "
                          f"{tmp_path}/base.qcow2")
    code, out, err = cli(capsys, "validate", vm)
    assert code == 2 and "the overlay" in err and "is gone" in err


def test_the_hinted_fix_clears_it(vm, tmp_path, capsys):
    p = load(vm)
    storage.ensure_disks(p)
    os.unlink(tmp_path / "vm.qcow2")
    code, _, err = cli(capsys, "disk", "create", tmp_path / "vm.qcow2", "--backing",
                       tmp_path / "base.qcow2")
    assert code == 0, err
    assert overlays.lost(p) == []
    code, _, err = cli(capsys, "disk", "delete", tmp_path / "vm.qcow2")   # on purpose
    assert code == 0, err
    assert overlays.lost(p) == []                    # deleted by kvmrun: made afresh


def test_a_failed_start_forgets_what_it_made(vm, tmp_path):
    p = load(vm)
    made = storage.ensure_disks(p)
    storage.remove_created(made)                     # what a failed start does
    assert not Path(made[0]).exists() and overlays.lost(p) == []


# ---------------------------------------------------------------- the header's base

def _img(*args) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def test_an_overlay_on_another_base_is_reported_and_rebase_fixes_it(vm, tmp_path, capsys):
    """The base moved and the profile says the new place: validate names both files and the
    fix; `disk rebase` (header only) makes them agree; qemu-img then reads the new base."""
    p = load(vm)
    storage.ensure_disks(p)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(tmp_path / "base.qcow2")],
                   check=True, capture_output=True)
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "base.qcow2", tmp_path / "moved" / "base.qcow2")
    vm.write_text(vm.read_text().replace("backing: base.qcow2", "backing: moved/base.qcow2"))
    code, out, err = cli(capsys, "validate", vm)
    assert code == 2, err
    assert (f"disks[0].backing: the overlay {tmp_path}/vm.qcow2 is based on "
            f"{tmp_path}/base.qcow2, not on {tmp_path}/moved/base.qcow2 as the profile "
            "says") in err
    assert (f"hint: if {tmp_path}/moved/base.qcow2 is a copy of {tmp_path}/base.qcow2: "
            f"kvmrun disk rebase {tmp_path}/vm.qcow2 --backing {tmp_path}/moved/base.qcow2; "
            f"else make the profile say backing: {tmp_path}/base.qcow2") in err

    code, out, err = cli(capsys, "disk", "rebase", tmp_path / "vm.qcow2", "--backing",
                         tmp_path / "moved" / "base.qcow2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["old_backing"], result["backing_file"], result["backing_format"],
            result["changed"]) == (f"{tmp_path}/base.qcow2", f"{tmp_path}/moved/base.qcow2",
                                   "qcow2", True)
    os.unlink(tmp_path / "base.qcow2")                 # the overlay no longer needs it
    code, out, err = cli(capsys, "validate", vm)
    assert code == 0, err
    read = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x5a 0 64k",
                           str(tmp_path / "vm.qcow2")], capture_output=True, text=True)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
    code, out, err = cli(capsys, "disk", "rebase", tmp_path / "vm.qcow2", "--backing",
                         tmp_path / "moved" / "base.qcow2")
    assert code == 0 and "is already based on" in out


def test_rebase_refuses_what_cannot_be_the_same_base(vm, tmp_path, capsys):
    p = load(vm)
    storage.ensure_disks(p)
    overlay = tmp_path / "vm.qcow2"
    _img("create", "-q", "-f", "qcow2", tmp_path / "big.qcow2", "32M")
    _img("create", "-q", "-f", "raw", tmp_path / "small.img", "8M")
    _img("create", "-q", "-f", "raw", tmp_path / "plain.img", "16M")
    cases = [
        (tmp_path / "nothere.qcow2", "the new base"),
        (tmp_path / "big.qcow2", "is larger than the overlay"),
        (tmp_path / "small.img", "is not the size of the current one"),
        (overlay, "backing chain loop"),
    ]
    for new, said in cases:
        code, out, err = cli(capsys, "disk", "rebase", overlay, "--backing", new)
        assert code == 1 and said in err and "Traceback" not in err, (new, err)
    code, out, err = cli(capsys, "disk", "rebase", tmp_path / "plain.img", "--backing",
                         tmp_path / "base.qcow2")
    assert code == 1 and "only a qcow2 image has a backing file" in err
    # the old base gone: a same-size raw copy is accepted, its format pinned
    os.unlink(tmp_path / "base.qcow2")
    code, out, err = cli(capsys, "disk", "rebase", overlay, "--backing",
                         tmp_path / "plain.img")
    assert code == 0, err
    assert out.strip() == (f"rebased {overlay}: {tmp_path}/base.qcow2 -> "
                           f"{tmp_path}/plain.img (raw)")
