"""The quick verbs import only what they use (no timings here: bench/run.py measures those).

`status` and `list` run on the run directory and QMP alone: no YAML, no profile model, no
psutil; and no verb pulls in pydantic through typer's parameter coercion (kvmrun.cli.nopydantic). A
typer upgrade that brings pydantic back into every call fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from kvmrun.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = [n for n, m in sys.modules.items() if type(m).__name__ != "_LazyModule"]
sys.stdout.write("\\nMODULES " + json.dumps(sorted(loaded)) + "\\n")
"""


def modules_after(tmp_path, *args) -> set[str]:
    env = {"KVMRUN_RUN_DIR": str(tmp_path / "run"), "KVMRUN_CONFIG_DIR": str(tmp_path / "cfg"),
           "KVMRUN_CACHE_DIR": str(tmp_path / "cache"), "KVMRUN_DATA_DIR": str(tmp_path / "d"),
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True,
                          text=True, timeout=60)
    line = proc.stdout.rsplit("\nMODULES ", 1)[1]
    return set(json.loads(line))


HEAVY = {"pydantic", "yaml", "psutil", "kvmrun.profile", "kvmrun.qemu.compile",
         "kvmrun.ops.defined", "kvmrun.net.nics", "kvmrun.storage.disks",
         "aiohttp", "kvmrun.ui.server", "xml.etree.ElementTree"}   # aiohttp: `kvmrun ui` only


@pytest.mark.parametrize("args", [["list", "--json"], ["list"], ["status", "web1", "--json"],
                                  ["status", "web1"]])
def test_status_and_list_stay_light(tmp_path, args):
    assert not HEAVY & modules_after(tmp_path, *args)


def test_help_imports_no_profile_machinery(tmp_path):
    assert not HEAVY & modules_after(tmp_path, "--help")


def test_cmdline_needs_yaml_but_not_pydantic(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\naccel: tcg\nmemory: 64M\nnetwork: []\n")
    loaded = modules_after(tmp_path, "cmdline", str(profile))
    assert "kvmrun.qemu.compile" in loaded
    assert "pydantic" not in loaded
