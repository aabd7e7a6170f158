"""Another local user as the attacker (issue 12, bugs 1 and 13). Each test creates
throw-away users with `useradd` and removes them (`userdel -r`) afterwards, and runs
kvmrun as them with `setpriv` (the system python, with this checkout and the venv's
packages on PYTHONPATH: the venv's own interpreter lives under /root).

    a planted /tmp/kvmrun-UID (another owner, a supervisor.log link) is refused
    a run directory of the user's own that others may enter is tightened to 0700
    `gdb: true` is a unix socket another user cannot reach (TCP was reachable)
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SITE = next((REPO / ".venv" / "lib").glob("python3*/site-packages"), None)
PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv")
    or SITE is None or not os.path.exists(PYTHON)
    or subprocess.run([PYTHON, "-c", "import sys; assert sys.version_info[:2] == "
                       f"{tuple(sys.version_info[:2])}"]).returncode != 0,
    reason="needs root, useradd, setpriv and a system python of the venv's version")


@pytest.fixture
def make_user():
    made = []

    def make() -> pwd.struct_passwd:
        name = f"krt{uuid.uuid4().hex[:8]}"
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        made.append(name)
        return pwd.getpwnam(name)
    yield make
    for name in made:
        for pid in _processes_of(pwd.getpwnam(name).pw_uid):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                signal_kill(fd)
            finally:
                os.close(fd)
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def signal_kill(fd: int) -> None:
    import signal
    signal.pidfd_send_signal(fd, signal.SIGKILL)


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def as_user(user: pwd.struct_passwd, *args: str, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`kvmrun ARGS` as `user`, with a clean environment (no XDG_RUNTIME_DIR)."""
    base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir,
                "USER": user.pw_name, "PYTHONPATH": f"{REPO}:{SITE}",
                "KVMRUN_ACCEL": "tcg", **(env or {})}
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
         PYTHON, "-m", "kvmrun", *args],
        env=base_env, capture_output=True, text=True, timeout=120, cwd=user.pw_dir,
        stdin=subprocess.DEVNULL)


def as_user_run(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                           "--init-groups", *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_a_planted_run_directory_is_refused(make_user):
    victim, attacker = make_user(), make_user()
    planted = Path(f"/tmp/kvmrun-{victim.pw_uid}")
    assert not planted.exists()
    # the attacker plants the victim's default run directory, open to all, with a link
    # that would append the supervisor's log to the victim's ~/.profile
    profile_file = Path(victim.pw_dir) / ".profile"
    profile_file.write_text("# victim's profile\n")
    os.chown(profile_file, victim.pw_uid, victim.pw_gid)
    before = profile_file.read_bytes()
    assert as_user_run(attacker, "mkdir", "-m", "0777", str(planted)).returncode == 0
    assert as_user_run(attacker, "mkdir", "-m", "0777", str(planted / "vm")).returncode == 0
    assert as_user_run(attacker, "ln", "-s", str(profile_file),
                       str(planted / "vm" / "supervisor.log")).returncode == 0
    try:
        vm = Path(victim.pw_dir) / "vm.yaml"
        vm.write_text("name: vm\nmemory: 64\naccel: tcg\nnetwork: []\nserial: none\n")
        os.chown(vm, victim.pw_uid, victim.pw_gid)
        for args in (["start", str(vm)], ["status", "vm"], ["console", "vm"],
                     ["logs", "vm"]):
            result = as_user(victim, *args)
            assert result.returncode == 3, (args, result.stdout, result.stderr)
            assert f"refusing to use {planted}" in result.stderr
            assert f"belongs to uid {attacker.pw_uid}" in result.stderr
            assert "Traceback" not in result.stderr
        assert profile_file.read_bytes() == before
        assert not [p for p in _processes_of(victim.pw_uid)]
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_an_own_run_directory_open_to_others_is_tightened(make_user):
    user = make_user()
    own = Path(f"/tmp/kvmrun-{user.pw_uid}")
    assert as_user_run(user, "mkdir", "-m", "0777", str(own)).returncode == 0
    try:
        vm = Path(user.pw_dir) / "vm.yaml"
        vm.write_text("name: vm\nmemory: 64\naccel: tcg\nnetwork: []\n")
        result = as_user(user, "status", "vm")
        assert result.returncode == 4 and "no guest named 'vm'" in result.stderr, result
        assert own.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(own, ignore_errors=True)


@pytest.mark.qemu
@pytest.mark.slow
def test_gdb_stub_is_out_of_another_users_reach(kr, tiny_guest, make_user):
    """`gdb: true` listens on gdb.sock inside the 0700 run directory: another local user
    gets EACCES (over TCP on 127.0.0.1 they could pause the guest and read its memory)."""
    other = make_user()
    kr.start(kr.profile("g", tiny_guest, gdb=True))
    sock_path = kr.guest_dir("g") / "gdb.sock"
    assert sock_path.is_socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:   # the owner reaches it
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b"+$?#3f")
        assert s.recv(64)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             f"try:\n s.connect({str(sock_path)!r}); print('CONNECTED')\n"
             "except OSError as e: print(e.errno)\n")
    result = as_user_run(other, PYTHON, "-c", probe)
    assert result.stdout.strip() == str(13), result      # EACCES
    kr.ok("kill", "g")


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in
                Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


@pytest.mark.qemu
@pytest.mark.slow
def test_qemu_drops_to_an_unprivileged_user(kr, tiny_guest, make_user):
    """kvmrun as root with KVMRUN_QEMU_USER: QEMU opens its disk, sockets and logs as
    root, then runs as that user with no capabilities, under its seccomp filter; the
    guest boots, answers QMP and stops gracefully."""
    user = make_user()
    kr.env = {**kr.env, "KVMRUN_QEMU_USER": user.pw_name}
    disk = kr.base / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    kr.start(kr.profile("g", tiny_guest, disks=[{"path": str(disk)}]))
    info = kr.status("g")
    assert info["qemu_user"] == user.pw_name and info["qemu_status"] == "running"
    assert "elevateprivileges=allow" in info["sandbox"]
    status = proc_status(info["pid"])
    assert status["Uid"].split() == [str(user.pw_uid)] * 4
    assert int(status["CapEff"], 16) == 0 and status["Seccomp"].strip() == "2"
    assert kr.ok("stop", "g").code == 0
    ended = kr.wait_state("g", lambda i: i["state"] != "running")["ended"]
    assert ended["reason"] == "stopped" and ended["by"] == "kvmrun stop", ended


def test_qemu_user_must_exist(kr, tmp_path):
    kr.env = {**kr.env, "KVMRUN_QEMU_USER": "no-such-user-krt"}
    (kr.base / "v.yaml").write_text("name: v\nmemory: 64\naccel: tcg\nnetwork: []\n")
    code, out, err = kr.run("start", kr.base / "v.yaml")
    assert code == 3 and "KVMRUN_QEMU_USER='no-such-user-krt': no such user" in err


@pytest.mark.qemu
@pytest.mark.slow
def test_root_qemu_runs_as_the_kvmrun_user_by_default(kr, tiny_guest):
    """No KVMRUN_QEMU_USER: a root kvmrun's QEMU runs as the `kvmrun` system user (made
    at the first start if missing); what a running guest opens later through QMP works
    as that user (a savevm snapshot, a live resize); status names the user."""
    kr.env = {k: v for k, v in kr.env.items() if k != "KVMRUN_QEMU_USER"}
    disk = kr.base / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    kr.start(kr.profile("g", tiny_guest, disks=[{"path": str(disk)}]))
    user = pwd.getpwnam("kvmrun")
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000     # --system
    info = kr.status("g")
    assert info["qemu_user"] == "kvmrun" and info["qemu_user_why"] is None
    assert proc_status(info["pid"])["Uid"].split() == [str(user.pw_uid)] * 4
    assert "  runs as  kvmrun\n" in kr.ok("status", "g").out
    kr.ok("snapshot", "create", "g", "s1")
    kr.ok("disk", "resize", disk, "+16M", "--live", "g")
    assert kr.status("g")["qemu_status"] == "running"
    assert kr.ok("stop", "g").code == 0
    ended = kr.wait_state("g", lambda i: i["state"] != "running")["ended"]
    assert ended["reason"] == "stopped", ended


def test_root_can_keep_qemu_root_on_purpose(kr):
    """KVMRUN_QEMU_USER=root: no -runas; the default adds it."""
    (kr.base / "v.yaml").write_text("name: v\nmemory: 64\naccel: tcg\nnetwork: []\n")
    default = kr.ok("cmdline", kr.base / "v.yaml").out
    assert "-runas kvmrun" in default
    kr.env = {**kr.env, "KVMRUN_QEMU_USER": "root"}
    assert "-runas" not in kr.ok("cmdline", kr.base / "v.yaml").out


def test_the_qemu_user_is_made_on_demand():
    """ensure_qemu_user makes a missing system user (no home, no login shell)."""
    from kvmrun.qemu.host import ensure_qemu_user
    name = f"krt{uuid.uuid4().hex[:8]}"
    said = []
    try:
        ensure_qemu_user(name, said.append)
        made = pwd.getpwnam(name)
        assert made.pw_shell == "/usr/sbin/nologin" and made.pw_uid < 1000
        assert not os.path.exists(made.pw_dir)
        assert said and "useradd --system --no-create-home" in said[0]
        ensure_qemu_user(name, said.append)         # there: nothing more to do or say
        assert len(said) == 1
    finally:
        subprocess.run(["userdel", name], capture_output=True)
