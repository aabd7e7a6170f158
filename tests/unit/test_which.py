"""kvmrun.proc.which is shutil.which (kvmrun's own: importing shutil loads bz2 and lzma, ~3 ms
of every start): the same answer for the same question."""

from __future__ import annotations

import os
import shutil

import pytest

from kvmrun import proc


@pytest.fixture
def folders(tmp_path):
    """Two PATH folders: a program in each (the first wins), one not executable, a
    directory with a program's name, and a link to a program."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "both").write_text("#!/bin/sh\n")
        (folder / "both").chmod(0o755)
    (b / "only-b").write_text("#!/bin/sh\n")
    (b / "only-b").chmod(0o755)
    (a / "plain").write_text("not a program\n")
    (a / "only-b").mkdir()                          # a directory is not a program
    (a / "link").symlink_to(b / "only-b")
    return a, b


@pytest.mark.parametrize("program", ["both", "only-b", "plain", "link", "missing", "sh"])
def test_which_finds_what_shutil_finds(folders, program, monkeypatch):
    a, b = folders
    path = os.pathsep.join([str(a), str(b), str(a), "/bin"])      # a repeated folder too
    assert proc.which(program, path=path) == shutil.which(program, path=path)
    monkeypatch.setenv("PATH", path)
    assert proc.which(program) == shutil.which(program)


def test_which_checks_a_path_as_it_is(folders):
    a, b = folders
    for program in (str(b / "only-b"), str(a / "plain"), str(a / "only-b"), str(a / "none"),
                    "./none"):
        assert proc.which(program, path=str(a)) == shutil.which(program, path=str(a))
    assert proc.which(str(b / "only-b")) == str(b / "only-b")


def test_which_of_an_empty_path_finds_nothing(folders, monkeypatch):
    a, _ = folders
    monkeypatch.chdir(a)                    # "both" is right here: an empty path still
    assert proc.which("both", path="") == shutil.which("both", path="") is None   # misses it
    monkeypatch.setenv("PATH", "")
    assert proc.which("both") == shutil.which("both") is None
