"""The store verbs through the installed `kvmrun` entry point, as a user runs them: exit codes,
output, no tracebacks. (No QEMU is started.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KVMRUN = Path(sys.executable).with_name("kvmrun")

pytestmark = pytest.mark.skipif(not KVMRUN.exists(), reason="kvmrun entry point not installed")


@pytest.fixture
def run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VISUAL", "EDITOR")}

    def kvmrun(*args, host="a", **extra):
        for var in ("CONFIG", "RUN", "DATA", "CACHE"):
            env[f"KVMRUN_{var}_DIR"] = str(tmp_path / host / var.lower())
        p = subprocess.run([str(KVMRUN), *args], capture_output=True, text=True, cwd=tmp_path,
                           env={**env, **extra}, timeout=60, stdin=subprocess.DEVNULL)
        assert "Traceback" not in p.stderr
        return p.returncode, p.stdout, p.stderr
    return kvmrun


def test_a_vm_lifecycle_in_the_store(run, tmp_path):
    (tmp_path / "root.qcow2").write_bytes(b"")
    (tmp_path / "web.yaml").write_text("name: web\narch: x86_64\nmemory: 1G\n"
                                       "disks:\n  - path: root.qcow2\n")
    vms = tmp_path / "a" / "config" / "vms"
    assert run("define", "web.yaml") == (0, f"defined web ({vms}/web.yaml)\n", "")
    code, out, _ = run("defined")
    assert code == 0 and out.splitlines()[1].split()[:5] == ["web", "x86_64", "1G", "1", "1"]
    assert "memory" not in (vms / "web.yaml").read_text()       # 1G is the default
    assert run("validate", "web") == (0, "web: ok\n", "")

    code, exported, _ = run("export", "web")
    assert code == 0 and exported == (vms / "web.yaml").read_text()
    (tmp_path / "web.export.yaml").write_text(exported)

    sed = f"{sys.executable} -c \"import sys,pathlib; p=pathlib.Path(sys.argv[1]); " \
          f"p.write_text(p.read_text().replace('arch: x86_64', 'arch: x86_64\\nmemory: 2G'))\""
    assert run("edit", "web", EDITOR=sed) == (0, f"edited web ({vms}/web.yaml)\n", "")
    assert "memory: 2048\n" in (vms / "web.yaml").read_text()

    # another host: the disk is missing there until we say so
    code, out, err = run("import", "web.export.yaml", "--name", "web-b", host="b")
    assert code == 0, err                      # same machine: the disk path exists
    os.unlink(tmp_path / "root.qcow2")
    code, out, err = run("import", "web.export.yaml", host="c")
    assert (code, out) == (2, "")
    assert err.startswith("kvmrun: error: web.export.yaml:5: ") and \
        f"disks[0].path: disk '{tmp_path}/root.qcow2' not found" in err

    assert run("undefine", "web") == (0, f"undefined web (removed {vms}/web.yaml)\n", "")
    code, _, err = run("undefine", "web")
    assert code == 2 and err.startswith("kvmrun: error: no defined VM named 'web'")
    code, _, err = run("define", "web.yaml", "--name", "no/slash")
    assert code == 2 and "not a valid VM name" in err
