"""The library calls behind the web UI's Guests page and its Start button: the rows of
defined VMs, and the profile a guest NAME starts again from (kvmrun.ops.profiles)."""

from __future__ import annotations


import pytest

from kvmrun import records
from kvmrun.errors import InvalidName, ProfileError
from kvmrun.guest.rundir import Guest
from kvmrun.ops import defined, profiles
from kvmrun.profile import load

PROFILE = "name: {name}\naccel: tcg\nmemory: 192M\nsmp: 3\nnetwork: []\n"


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    for key, sub in (("CONFIG", "cfg"), ("RUN", "run"), ("DATA", "data"), ("CACHE", "cache")):
        monkeypatch.setenv(f"KVMRUN_{key}_DIR", str(tmp_path / sub))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _file(env, name: str):
    path = env / f"{name}.yaml"
    path.write_text(PROFILE.format(name=name))
    return path


def test_a_defined_vm_that_never_ran_has_a_row_with_its_memory_and_vcpus(env):
    api = pytest.importorskip("kvmrun.ui.api")        # needs aiohttp (the `ui` extra)
    defined.define(load(_file(env, "web1")), check_files=False)
    rows = api.GuestRows().rows()
    assert [(r["name"], r["state"], r["memory_mib"], r["vcpus"], r["defined"])
            for r in rows] == [("web1", "defined", 192, 3, True)]


def test_a_defined_vm_restarts_from_its_definition(env):
    defined.define(load(_file(env, "web1")), check_files=False)
    (env / "web1.yaml").write_text(PROFILE.format(name="web1").replace("smp: 3", "smp: 1"))
    assert profiles.restart_profile("web1").smp == 3          # the defined file, not ./web1.yaml


def test_a_guest_restarts_from_the_file_its_state_names(env):
    source = _file(env, "tiny")
    Guest("copy").paths.dir.mkdir(parents=True)
    Guest("copy").write_state({"state": "stopped", "summary": {"source": str(source)}})
    prof = profiles.restart_profile("copy")
    assert (prof.name, prof.smp, prof.source) == ("copy", 3, str(source))
    assert records.replace(prof, name="tiny") == load(source)


def test_a_name_with_nothing_to_restart_from_is_one_plain_error(env):
    with pytest.raises(ProfileError, match="no such profile file or defined VM"):
        profiles.restart_profile("nothing")
    with pytest.raises(InvalidName):
        profiles.restart_profile("bad/name")
