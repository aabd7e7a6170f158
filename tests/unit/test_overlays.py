"""A backing-file overlay kvmrun made and that is gone is an error at validate and start, not
a silent re-creation (real qemu-img; the record lives in the test's own data directory)."""

from __future__ import annotations

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
