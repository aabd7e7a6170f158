"""The VM store: define / undefine / edit / export / import / defined, run through the real CLI
(`kvmrun.cli.main`) with exact output and exit codes, plus the library functions.

Every test isolates itself: KVMRUN_CONFIG_DIR, KVMRUN_RUN_DIR and KVMRUN_DATA_DIR point into
tmp_path (the QEMU capability cache is shared per session, it only costs speed)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kvmrun import cli, records
from kvmrun.ops import defined as store
from kvmrun.qemu.compile import HostFacts, compile as compile_argv, stable_mac
from kvmrun.paths import RunPaths
from kvmrun.profile import load

UUID_WEB = "0e6a0ce1-125d-5745-940f-c3a86b68996d"     # uuid5(URL, "kvmrun:web")


@pytest.fixture(scope="session")
def qemu_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qemu-cache")


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch, qemu_cache):
    cfg, run, data = tmp_path / "cfg", tmp_path / "run", tmp_path / "data"
    monkeypatch.setenv("KVMRUN_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("KVMRUN_RUN_DIR", str(run))
    monkeypatch.setenv("KVMRUN_DATA_DIR", str(data))
    monkeypatch.setenv("KVMRUN_CACHE_DIR", str(qemu_cache))
    for var in ("VISUAL", "EDITOR", "KVMRUN_DEBUG", "KVMRUN_ACCEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return {"cfg": cfg, "run": run, "data": data, "vms": cfg / "vms", "tmp": tmp_path}


def kvmrun(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.qcow2"
    p.write_bytes(b"")
    return p


@pytest.fixture
def web(tmp_path, disk):
    """A profile with extends, a relative disk path and a non-default memory."""
    write(tmp_path / "base.yaml", """
        arch: x86_64
        memory: 2G
        smp: 2
    """)
    return write(tmp_path / "web.yaml", """
        extends: base.yaml
        name: web
        description: the web server
        disks:
          - path: disk.qcow2
        network:
          - forward: 8080:80
    """)


def stored(env, name="web") -> Path:
    return env["vms"] / f"{name}.yaml"


EXPORTED_WEB = """\
name: web
description: the web server
uuid: {uuid}
arch: x86_64
smp: 2
memory: 2048
disks:
- path: {disk}
network:
- forward:
  - tcp:127.0.0.1:8080-:80
"""


# ---------------------------------------------------------------- define

def test_define_writes_the_exported_form(capsys, env, web, disk):
    code, out, err = kvmrun(capsys, "define", str(web))
    assert (code, err) == (0, "")
    assert out == f"defined web ({stored(env)})\n"
    assert stored(env).read_text() == EXPORTED_WEB.format(uuid=UUID_WEB, disk=disk)
    assert stored(env).stat().st_mode & 0o777 == 0o644
    assert env["vms"].stat().st_mode & 0o777 == 0o755
    assert env["cfg"].stat().st_mode & 0o777 == 0o755
    assert os.listdir(env["vms"]) == ["web.yaml"]           # no temporary left


def test_define_dirs_are_0755_whatever_the_umask(capsys, env, web):
    old = os.umask(0o077)
    try:
        assert kvmrun(capsys, "define", str(web))[0] == 0
    finally:
        os.umask(old)
    assert env["vms"].stat().st_mode & 0o777 == 0o755
    assert stored(env).stat().st_mode & 0o777 == 0o644


def test_define_same_profile_again_is_a_no_op(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    before = stored(env).stat().st_mtime_ns
    code, out, err = kvmrun(capsys, "define", str(web))
    assert (code, err) == (0, "")
    assert out == f"web is already defined with this profile ({stored(env)})\n"
    assert stored(env).stat().st_mtime_ns == before


def test_define_same_vm_written_differently_is_a_no_op(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    by_hand = "# edited by hand\n" + stored(env).read_text().replace("memory: 2048", "memory: 2G")
    stored(env).write_text(by_hand)
    code, out, err = kvmrun(capsys, "define", str(web))
    assert (code, out, err) == (0, f"web is already defined with this profile ({stored(env)})\n",
                                "")
    assert stored(env).read_text() == by_hand


def test_define_refuses_a_different_vm_without_force(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    code, out, err = kvmrun(capsys, "define", str(web), "--set", "memory=4G")
    assert (code, out) == (1, "")
    assert err == (f"kvmrun: error: a different VM 'web' is already defined ({stored(env)})\n"
                   "  hint: --force replaces it; `kvmrun edit web` changes it; --name NEW "
                   "defines a second one\n")
    assert stored(env).read_bytes() == before
    code, out, err = kvmrun(capsys, "define", str(web), "--set", "memory=4G", "--force")
    assert (code, err) == (0, "")
    assert out == f"redefined web ({stored(env)}), replacing the previous profile\n"
    assert "memory: 4096\n" in stored(env).read_text()


def test_define_with_a_new_name(capsys, env, web):
    code, out, err = kvmrun(capsys, "define", str(web), "--name", "web2")
    assert (code, out, err) == (0, f"defined web2 ({stored(env, 'web2')})\n", "")
    prof = load(stored(env, "web2"))
    assert prof.name == "web2"
    assert prof.uuid == load(stored(env, "web2")).vm_uuid != UUID_WEB   # derived from web2


@pytest.mark.parametrize("bad", ["bad/name", "-web", "web-", "a..b", "x" * 65, "wéb", "a b"])
def test_define_rejects_invalid_names(capsys, env, web, bad):
    code, out, err = kvmrun(capsys, "define", str(web), "--name", bad)
    assert (code, out) == (2, "")
    assert err == (f"kvmrun: error: {bad!r} is not a valid VM name (letters, digits and "
                   ". _ - between them, at most 64 characters)\n")
    assert not env["vms"].exists()


@pytest.mark.parametrize("good", ["a", "web.example-1_x", "X" * 64, "0"])
def test_define_accepts_valid_names(capsys, env, web, good):
    assert kvmrun(capsys, "define", str(web), "--name", good)[0] == 0
    assert stored(env, good).is_file()


def test_define_reports_missing_files_like_validate(capsys, env, tmp_path):
    prof = write(tmp_path / "db.yaml", """
        name: db
        arch: x86_64
        disks:
          - path: /nonexistent/a.qcow2
        cdrom: install.iso
    """)
    code, out, err = kvmrun(capsys, "define", str(prof))
    assert (code, out) == (2, "")
    assert err == (f"kvmrun: error: {prof}:4: disks[0].path: disk '/nonexistent/a.qcow2' "
                   "not found\n"
                   f"{prof}:5: cdrom: CD-ROM image '{tmp_path}/install.iso' not found\n"
                   "  hint: fix the paths, or pass --no-check-files and fix them later with "
                   "`kvmrun edit`\n")
    assert not stored(env, "db").exists()
    code, out, err = kvmrun(capsys, "define", str(prof), "--no-check-files")
    assert (code, out, err) == (0, f"defined db ({stored(env, 'db')})\n", "")


def test_define_profile_error_names_file_line_key(capsys, env, tmp_path):
    prof = write(tmp_path / "bad.yaml", """
        name: bad
        memroy: 2G
    """)
    code, out, err = kvmrun(capsys, "define", str(prof))
    assert (code, out) == (2, "")
    assert err.startswith(f"kvmrun: error: {prof}:2: memroy: unknown key (did you mean "
                          "'memory'?)\n")
    assert "Traceback" not in err


def test_define_checks_machine_type_against_qemu(capsys, env, tmp_path):
    prof = write(tmp_path / "m.yaml", """
        name: m
        arch: x86_64
        machine: q35x
    """)
    code, out, err = kvmrun(capsys, "define", str(prof))
    assert code == 2
    assert f"{prof}:3: machine: machine type 'q35x' is not known to" in err
    assert not stored(env, "m").exists()


def test_define_without_qemu_installed_warns(capsys, env, tmp_path, monkeypatch):
    from kvmrun.qemu import host
    from kvmrun.errors import HostError

    def missing(arch):
        raise HostError("qemu-system-x86_64 not found on PATH")
    monkeypatch.setattr(host, "qemu_binary", missing)
    prof = write(tmp_path / "m.yaml", "name: m\narch: x86_64\nmachine: q35\n")
    code, out, err = kvmrun(capsys, "define", str(prof))
    assert (code, out) == (0, f"defined m ({stored(env, 'm')})\n")
    assert err == ("kvmrun: warning: machine type and CPU model not checked: "
                   "qemu-system-x86_64 not found on PATH\n")


def test_failed_define_leaves_old_file_byte_identical(capsys, env, web, tmp_path):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    write(web, "name: web\nmemory: lots\n")
    code, _, err = kvmrun(capsys, "define", str(web), "--force")
    assert code == 2 and "memory: 'lots' is not a size" in err
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_crash_mid_write_leaves_no_partial_file(capsys, env, web, monkeypatch, where):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()

    def boom(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, where, boom)
    code, out, err = kvmrun(capsys, "define", str(web), "--set", "memory=8G", "--force")
    monkeypatch.undo()
    assert (code, out) == (1, "")
    assert err == f"kvmrun: error: cannot write {stored(env)}: Input/output error\n"
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


def test_interrupt_mid_write_leaves_no_partial_file(env, web, monkeypatch):
    store.define(load(web))
    before = stored(env).read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.define(load(web, ["memory=8G"]), force=True)
    monkeypatch.undo()
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


def test_new_vm_crash_mid_write_leaves_nothing(capsys, env, web, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space "
                                                                              "left on device")))
    code, _, err = kvmrun(capsys, "define", str(web))
    monkeypatch.undo()
    assert code == 1 and err.endswith("No space left on device\n")
    assert os.listdir(env["vms"]) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_vm_dir(capsys, env, web):
    env["vms"].mkdir(parents=True)
    env["vms"].chmod(0o555)
    try:
        code, _, err = kvmrun(capsys, "define", str(web))
    finally:
        env["vms"].chmod(0o755)
    assert code == 1 and err.startswith(f"kvmrun: error: cannot write {stored(env)}: ")
    assert os.listdir(env["vms"]) == []


def test_unwritable_vm_dir(capsys, env, web):
    env["cfg"].mkdir()
    env["vms"].write_text("")                   # works as root too: not a directory
    code, out, err = kvmrun(capsys, "define", str(web))
    assert (code, out) == (1, "")
    assert err == f"kvmrun: error: cannot write {stored(env)}: Not a directory\n"
    assert env["vms"].read_text() == ""


def test_define_from_a_defined_vm_copies_it_and_warns_about_the_uuid(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    code, out, err = kvmrun(capsys, "define", "web", "--name", "web2")
    assert (code, out) == (0, f"defined web2 ({stored(env, 'web2')})\n")
    assert err == (f"kvmrun: warning: uuid {UUID_WEB} is also the uuid of web; two VMs with "
                   "one SMBIOS UUID confuse guests and tools (--new-uuid derives one from "
                   "the new name)\n")
    code, out, err = kvmrun(capsys, "define", "web", "--name", "web3", "--new-uuid")
    assert (code, err) == (0, "")
    assert load(stored(env, "web3")).uuid != UUID_WEB


def test_explicit_uuid_is_kept(capsys, env, tmp_path):
    prof = write(tmp_path / "u.yaml", "name: u\nuuid: 12345678-1234-1234-1234-123456789abc\n")
    kvmrun(capsys, "define", str(prof), "--name", "v")
    assert load(stored(env, "v")).uuid == "12345678-1234-1234-1234-123456789abc"


# ---------------------------------------------------------------- resolve

def test_resolve_name_file_and_ambiguity(capsys, env, web, tmp_path):
    kvmrun(capsys, "define", str(web), "--name", "vm1")
    write(tmp_path / "vm1", "name: fromfile\n")             # a file named like the VM
    assert store.resolve("vm1").name == "vm1"                 # bare word: the defined VM
    assert store.resolve("./vm1").name == "fromfile"          # '/' : the file
    write(tmp_path / "other", "name: other\n")
    assert store.resolve("other").name == "other"             # no such VM: the file
    assert store.resolve("web.yaml").name == "web"            # .yaml: the file
    with pytest.raises(Exception) as e:
        store.resolve("vm2")
    assert str(e.value) == "vm2: no such profile file or defined VM\n  hint: did you mean 'vm1'?"


def test_profile_arguments_accept_defined_names(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    code, out, err = kvmrun(capsys, "validate", "web")
    assert (code, out, err) == (0, "web: ok\n", "")
    code, out, _ = kvmrun(capsys, "cmdline", "web", "--json")
    assert code == 0 and json.loads(out)[:5] == ["qemu-system-x86_64", "-name",
                                                 "guest=web,process=kvmrun-web", "-uuid",
                                                 UUID_WEB]


# ---------------------------------------------------------------- export

def test_export_prints_the_stored_profile(capsys, env, web, disk):
    kvmrun(capsys, "define", str(web))
    code, out, err = kvmrun(capsys, "export", "web")
    assert (code, err) == (0, "")
    assert out == stored(env).read_text() == EXPORTED_WEB.format(uuid=UUID_WEB, disk=disk)


def test_export_of_a_file_resolves_extends_and_paths(capsys, env, web, disk):
    code, out, err = kvmrun(capsys, "export", str(web))
    assert (code, out, err) == (0, EXPORTED_WEB.format(uuid=UUID_WEB, disk=disk), "")
    assert not env["vms"].exists()                            # export defines nothing


def test_export_output_and_json(capsys, env, web, tmp_path):
    target = tmp_path / "out" / "web-export.yaml"
    code, out, err = kvmrun(capsys, "export", str(web), "--output", str(target))
    assert (code, out, err) == (0, f"exported web to {target}\n", "")
    assert load(target) == records.replace(load(web), uuid=UUID_WEB)
    code, out, _ = kvmrun(capsys, "export", str(web), "--json")
    assert json.loads(out) == yaml.safe_load(target.read_text())


def test_export_unknown(capsys, env):
    code, out, err = kvmrun(capsys, "export", "nosuch")
    assert (code, out) == (2, "")
    assert err == ("kvmrun: error: nosuch: no such profile file or defined VM\n"
                   "  hint: give a path to a .yaml profile, or the name of a defined VM (see "
                   "`kvmrun list --defined`)\n")


# ---------------------------------------------------------------- import and the round trip

def other_host(monkeypatch, tmp_path, label):
    for var in ("CONFIG", "RUN", "DATA"):
        monkeypatch.setenv(f"KVMRUN_{var}_DIR", str(tmp_path / label / var.lower()))
    return tmp_path / label / "config" / "vms"


def argv_for(profile):
    host = HostFacts(machine="x86_64", kvm=True, uefi={"x86_64": "/fw/OVMF_CODE.fd"})
    run = RunPaths(Path("/run/kvmrun") / profile.name,
                   Path(f"/var/lib/kvmrun/nvram/{profile.name}_VARS.fd"))
    return compile_argv(profile, host, run)


def test_round_trip_export_import_other_name_other_host(capsys, env, web, tmp_path,
                                                        monkeypatch):
    kvmrun(capsys, "define", str(web), "--set", "firmware=uefi", "--set", "boot=dc")
    exported = tmp_path / "web.export.yaml"
    assert kvmrun(capsys, "export", "web", "-o", str(exported))[0] == 0
    vms_b = other_host(monkeypatch, tmp_path, "hostB")
    code, out, err = kvmrun(capsys, "import", str(exported), "--name", "other")
    assert (code, out, err) == (0, f"imported other ({vms_b / 'other.yaml'})\n", "")

    original, moved = load(stored(env)), store.resolve("other")
    assert moved.uuid == original.uuid == UUID_WEB            # SMBIOS identity travels
    a, b = argv_for(original), argv_for(moved)
    assert a != b
    renamed = [x.replace("other", "web").replace(stable_mac("other", 0), stable_mac("web", 0))
               for x in b]
    assert renamed == a
    # and without --name, the argv is identical
    vms_c = other_host(monkeypatch, tmp_path, "hostC")
    assert kvmrun(capsys, "import", str(exported))[0] == 0
    assert (vms_c / "web.yaml").read_text() == stored(env).read_text()
    assert argv_for(store.resolve("web")) == a


def test_import_new_uuid(capsys, env, web, tmp_path):
    kvmrun(capsys, "export", str(web), "-o", str(tmp_path / "e.yaml"))
    code, out, err = kvmrun(capsys, "import", str(tmp_path / "e.yaml"), "--name", "copy",
                            "--new-uuid")
    assert (code, err) == (0, "")
    assert load(stored(env, "copy")).uuid == load(web, ["name=copy"]).vm_uuid != UUID_WEB


def test_import_reports_each_missing_file_with_its_key(capsys, env, tmp_path):
    exported = write(tmp_path / "e.yaml", """
        name: far
        uuid: 12345678-1234-1234-1234-123456789abc
        arch: x86_64
        kernel:
          path: /srv/far/vmlinuz
          initrd: /srv/far/initrd.img
        disks:
        - path: /srv/far/root.qcow2
        - path: /srv/far/data.qcow2
        cdrom: /srv/far/seed.iso
    """)
    code, out, err = kvmrun(capsys, "import", str(exported))
    assert (code, out) == (2, "")
    assert err == (f"kvmrun: error: {exported}:5: kernel.path: kernel path '/srv/far/vmlinuz' "
                   "not found\n"
                   f"{exported}:6: kernel.initrd: kernel initrd '/srv/far/initrd.img' not found\n"
                   f"{exported}:8: disks[0].path: disk '/srv/far/root.qcow2' not found\n"
                   f"{exported}:9: disks[1].path: disk '/srv/far/data.qcow2' not found\n"
                   f"{exported}:10: cdrom: CD-ROM image '/srv/far/seed.iso' not found\n"
                   "  hint: fix the paths, or pass --no-check-files and fix them later with "
                   "`kvmrun edit`\n")
    assert not env["vms"].exists()
    code, out, err = kvmrun(capsys, "import", str(exported), "--no-check-files")
    assert (code, out, err) == (0, f"imported far ({stored(env, 'far')})\n", "")
    assert load(stored(env, "far")).uuid == "12345678-1234-1234-1234-123456789abc"


def test_import_takes_a_file_not_a_name(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    code, out, err = kvmrun(capsys, "import", "web")
    assert (code, out) == (2, "")
    assert err == "kvmrun: error: web: file not found\n"


def test_import_refuses_to_overwrite(capsys, env, web, tmp_path):
    kvmrun(capsys, "define", str(web))
    write(tmp_path / "e.yaml", "name: web\nmemory: 512\n")
    code, _, err = kvmrun(capsys, "import", str(tmp_path / "e.yaml"))
    assert code == 1 and "a different VM 'web' is already defined" in err
    code, out, _ = kvmrun(capsys, "import", str(tmp_path / "e.yaml"), "--force")
    assert (code, out) == (0, f"reimported web ({stored(env)}), replacing the previous "
                              "profile\n")


# ---------------------------------------------------------------- undefine

def test_undefine(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    code, out, err = kvmrun(capsys, "undefine", "web")
    assert (code, out, err) == (0, f"undefined web (removed {stored(env)})\n", "")
    assert not stored(env).exists()
    code, out, err = kvmrun(capsys, "undefine", "web")
    assert (code, out) == (2, "")
    assert err == ("kvmrun: error: no defined VM named 'web'\n"
                   "  hint: no VMs are defined yet; see `kvmrun define`\n")


def test_undefine_unknown_suggests(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    kvmrun(capsys, "define", str(web), "--name", "db", "--new-uuid")
    assert kvmrun(capsys, "undefine", "wbe")[2] == ("kvmrun: error: no defined VM named "
                                                    "'wbe'\n  hint: did you mean 'web'?\n")
    assert kvmrun(capsys, "undefine", "zzz")[2] == ("kvmrun: error: no defined VM named "
                                                    "'zzz'\n  hint: defined VMs: db, web\n")
    assert kvmrun(capsys, "undefine", "../web")[0] == 2


def test_undefine_removes_nvram_unless_kept(capsys, env, web):
    nvram = env["data"] / "nvram" / "web_VARS.fd"
    nvram.parent.mkdir(parents=True)
    nvram.write_bytes(b"vars")
    kvmrun(capsys, "define", str(web))
    code, out, _ = kvmrun(capsys, "undefine", "web", "--keep-nvram")
    assert (code, out) == (0, f"undefined web (removed {stored(env)}); kept {nvram}\n")
    assert nvram.exists()
    kvmrun(capsys, "define", str(web))
    code, out, _ = kvmrun(capsys, "undefine", "web")
    assert (code, out) == (0, f"undefined web (removed {stored(env)}, {nvram})\n")
    assert not nvram.exists()


@pytest.fixture
def fake_qemu(env):
    pidfile = env["run"] / "web" / "qemu.pid"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name",
                             "guest=web,process=kvmrun-web", "-pidfile", str(pidfile)])
    yield proc
    proc.kill()
    proc.wait()


def write_state(env, name, pid, **extra):
    from kvmrun import proc
    d = env["run"] / name
    d.mkdir(parents=True, exist_ok=True)
    state = {"state": "running", "boot_id": proc.boot_id(), "qemu_pid": pid,
             "qemu_starttime": proc.starttime(pid) if pid else None, **extra}
    (d / "state.json").write_text(json.dumps(state))


def test_undefine_refuses_while_running(capsys, env, web, fake_qemu):
    kvmrun(capsys, "define", str(web))
    write_state(env, "web", fake_qemu.pid)
    assert store.is_running("web")
    code, out, err = kvmrun(capsys, "undefine", "web")
    assert (code, out) == (4, "")
    assert err == ("kvmrun: error: web is running; stop it before undefining it\n"
                   "  hint: kvmrun stop web\n")
    assert stored(env).exists()
    # a start in progress: the supervisor lives, QEMU is not recorded yet
    from kvmrun.proc import starttime as proc_starttime
    write_state(env, "web", None, state="starting", supervisor_pid=fake_qemu.pid,
                supervisor_starttime=proc_starttime(fake_qemu.pid))
    assert kvmrun(capsys, "undefine", "web")[0] == 4


def test_stale_or_foreign_state_does_not_block_undefine(capsys, env, web):
    kvmrun(capsys, "define", str(web))
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_state(env, "web", dead.pid, qemu_starttime=12345)
    assert not store.is_running("web")
    write_state(env, "web", os.getpid())          # alive, but not this guest's QEMU
    assert not store.is_running("web")
    (env["run"] / "web" / "state.json").write_text("{not json")
    assert not store.is_running("web")
    assert kvmrun(capsys, "undefine", "web")[0] == 0


# ---------------------------------------------------------------- edit

def editor(tmp_path, body: str, name="ed.py") -> str:
    """An $EDITOR: a Python script run on the file; `body` sees `path` and `text`."""
    script = tmp_path / name
    script.write_text("import sys, pathlib\npath = pathlib.Path(sys.argv[1])\n"
                      "text = path.read_text()\n" + textwrap.dedent(body))
    return f"{sys.executable} {script}"


def test_edit_saves_a_valid_change(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    monkeypatch.setenv("EDITOR", editor(tmp_path, """
        path.write_text(text.replace("memory: 2048", "memory: 3G"))
    """))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out, err) == (0, f"edited web ({stored(env)})\n", "")
    assert "memory: 3072\n" in stored(env).read_text()
    assert os.listdir(env["vms"]) == ["web.yaml"]


def test_edit_visual_wins_over_editor(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    monkeypatch.setenv("EDITOR", "false")
    monkeypatch.setenv("VISUAL", editor(tmp_path, "path.write_text(text.replace('smp: 2', 'smp: 4'))"))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert code == 0 and out == f"edited web ({stored(env)})\n"


def test_edit_unchanged(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    before = stored(env).stat().st_mtime_ns
    monkeypatch.setenv("EDITOR", "true")
    assert kvmrun(capsys, "edit", "web") == (0, "web unchanged\n", "")
    # a comment only changes nothing in the canonical form
    monkeypatch.setenv("EDITOR", editor(tmp_path, "path.write_text('# hi\\n' + text)"))
    assert kvmrun(capsys, "edit", "web") == (0, "web unchanged\n", "")
    assert stored(env).stat().st_mtime_ns == before


def test_edit_invalid_without_tty_keeps_the_old_one(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    monkeypatch.setenv("EDITOR", editor(tmp_path, "path.write_text(text + 'memroy: 1G\\n')"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out) == (2, "")
    assert re.fullmatch(
        rf"kvmrun: error: {re.escape(str(env['vms']))}/\.web\.edit-\w+\.yaml:12: memroy: "
        r"unknown key \(did you mean 'memory'\?\)\n  hint: known keys: .*\n"
        r"kvmrun: web unchanged\n", err)
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_edit_again_on_a_tty(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    count = tmp_path / "count"
    monkeypatch.setenv("EDITOR", editor(tmp_path, f"""
        n = pathlib.Path({str(count)!r})
        first = not n.exists()
        n.write_text("1")
        # the second round sees the first round's text: the copy is kept between rounds
        path.write_text(text.replace("smp: 2", "smp: many") if first
                        else text.replace("smp: many", "smp: 6"))
    """))
    monkeypatch.setattr(sys, "stdin", TTY("y\n"))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out) == (0, f"edited web ({stored(env)})\n")
    assert "smp: expected a whole number, found 'many'" in err
    assert err.endswith("edit again? [Y/n] ")
    assert "smp: 6\n" in stored(env).read_text()


def test_edit_again_declined(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    monkeypatch.setenv("EDITOR", editor(tmp_path, "path.write_text('name: web\\nsmp: 0\\n')"))
    monkeypatch.setattr(sys, "stdin", TTY("n\n"))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out) == (2, "")
    assert err.endswith("edit again? [Y/n] kvmrun: web unchanged\n")
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


def test_edit_cannot_rename(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    monkeypatch.setenv("EDITOR", editor(tmp_path, """
        path.write_text(text.replace("name: web", "name: www"))
    """))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out) == (2, "")
    assert re.search(r"\.yaml:1: name: the name cannot change in `kvmrun edit` \(this is "
                     r"'web', the file says 'www'\)\n  hint: to rename: kvmrun define web "
                     r"--name www && kvmrun undefine web\n", err)
    assert stored(env).read_bytes() == before


def test_edit_checks_files(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    monkeypatch.setenv("EDITOR", editor(tmp_path, "path.write_text(text + 'cdrom: x.iso\\n')"))
    code, _, err = kvmrun(capsys, "edit", "web")
    assert code == 2
    assert f"cdrom: CD-ROM image '{env['vms']}/x.iso' not found" in err  # relative: vms dir
    code, out, _ = kvmrun(capsys, "edit", "web", "--no-check-files")
    assert (code, out) == (0, f"edited web ({stored(env)})\n")
    assert f"cdrom: {env['vms']}/x.iso\n" in stored(env).read_text()


def test_edit_editor_fails(capsys, env, web, monkeypatch):
    kvmrun(capsys, "define", str(web))
    before = stored(env).read_bytes()
    monkeypatch.setenv("EDITOR", "false")
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out, err) == (1, "", "kvmrun: error: the editor 'false' exited with status 1;"
                                       " web unchanged\n")
    monkeypatch.setenv("EDITOR", "/nonexistent/editor")
    code, out, err = kvmrun(capsys, "edit", "web")
    assert code == 1 and err.startswith("kvmrun: error: cannot run the editor "
                                        "'/nonexistent/editor': ")
    assert stored(env).read_bytes() == before
    assert os.listdir(env["vms"]) == ["web.yaml"]


def test_edit_conflict_keeps_your_version(capsys, env, web, tmp_path, monkeypatch):
    kvmrun(capsys, "define", str(web))
    monkeypatch.setenv("EDITOR", editor(tmp_path, f"""
        stored = pathlib.Path({str(stored(env))!r})
        stored.write_text(stored.read_text().replace("smp: 2", "smp: 3"))   # someone else
        path.write_text(text.replace("smp: 2", "smp: 4"))
    """))
    code, out, err = kvmrun(capsys, "edit", "web")
    assert (code, out) == (1, "")
    m = re.fullmatch(rf"kvmrun: error: {re.escape(str(stored(env)))} changed while you were "
                     r"editing it; not saved; your version is in (\S+)\n", err)
    assert m and "smp: 4" in Path(m.group(1)).read_text()
    assert "smp: 3\n" in stored(env).read_text()


def test_edit_unknown(capsys, env):
    assert kvmrun(capsys, "edit", "nope") == (
        2, "", "kvmrun: error: no defined VM named 'nope'\n"
               "  hint: no VMs are defined yet; see `kvmrun define`\n")


# ---------------------------------------------------------------- defined

def test_defined_lists(capsys, env, web, tmp_path):
    kvmrun(capsys, "define", str(web))
    write(tmp_path / "db.yaml", "name: db\narch: aarch64\nmemory: 512\n")
    kvmrun(capsys, "define", str(tmp_path / "db.yaml"))
    (env["vms"] / ".web.yaml.abc.tmp").write_text("junk")     # ignored: a temporary
    (env["vms"] / "notes.txt").write_text("junk")             # ignored: not .yaml
    code, out, err = kvmrun(capsys, "defined")
    assert (code, err) == (0, "")
    assert out == (
        "NAME  ARCH     MEMORY  VCPUS  DISKS  FILE\n"
        f"db    aarch64  512M    1      0      {stored(env, 'db')}\n"
        f"web   x86_64   2G      2      1      {stored(env)}\n")
    code, out, _ = kvmrun(capsys, "defined", "--json")
    data = json.loads(out)
    assert [vm["name"] for vm in data] == ["db", "web"]
    assert data[1] == {"name": "web", "arch": "x86_64", "memory_mib": 2048, "vcpus": 2,
                       "disks": [str(tmp_path / "disk.qcow2")], "uuid": UUID_WEB,
                       "description": "the web server", "file": str(stored(env)),
                       "error": None}


def test_defined_empty_and_broken(capsys, env):
    assert kvmrun(capsys, "defined") == (
        0, "", f"no defined VMs in {env['vms']} (see `kvmrun define`)\n")
    assert kvmrun(capsys, "defined", "--json") == (0, "[]\n", "")
    write(env["vms"] / "bad.yaml", "name: bad\nsmp: lots\n")
    write(env["vms"] / "mis.yaml", "name: other\n")
    vms = store.list_defined()
    assert [(v.name, v.error) for v in vms] == [
        ("bad", f"{env['vms']}/bad.yaml:2: smp: expected a whole number, found 'lots'"),
        ("mis", "the file says name: 'other'; rename the file or fix the name")]
    code, out, _ = kvmrun(capsys, "defined")
    assert code == 0 and "(error: " in out


def test_help_documents_the_path_rule(capsys):
    code, out, _ = kvmrun(capsys, "export", "--help")
    assert code == 0
    assert "A path wins when it contains '/' or ends in .yaml" in " ".join(out.replace("│", " ").split())
