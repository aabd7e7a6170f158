"""kvmrun.guest.spawn with real processes: what a child of the supervisor gets (stdin
/dev/null, output in its log, a session of its own, the umask, SIGPIPE at its default, no
descriptor of ours), the fork+exec path's hook, exit codes read as Popen's, and a program
that cannot run raising OSError with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import sys
import subprocess
import textwrap
from pathlib import Path

import pytest

from kvmrun.guest import spawn

REPORT = textwrap.dedent("""
    import json, os, signal, sys
    print(json.dumps({"stdin": os.readlink("/proc/self/fd/0"), "sid": os.getsid(0),
                      "pid": os.getpid(), "umask": os.umask(0), "cwd": os.getcwd(),
                      "fds": sorted(int(f) for f in os.listdir("/proc/self/fd"))}), flush=True)
    print("to stderr", file=sys.stderr)
""")


def run(tmp_path, before_exec=None) -> tuple[dict, str, int]:
    log = tmp_path / "child.log"
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)        # as a pipe end passed to the supervisor
    try:
        spawn.seal_fds()
        with open(log, "wb") as out:
            child = spawn.start([sys.executable, "-I", "-c", REPORT], out.fileno(), 0o077,
                                before_exec=before_exec)
        code = child.wait(30)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    first, _, rest = log.read_text().partition("\n")
    return json.loads(first), rest, code


@pytest.mark.parametrize("hook", [False, True])
def test_what_a_child_gets(tmp_path, hook):
    ours = os.umask(0o022)
    os.umask(ours)
    seen, rest, code = run(tmp_path, (lambda: os.chdir(tmp_path)) if hook else None)
    assert code == 0 and rest == "to stderr\n"           # stdout and stderr into the log
    assert seen["stdin"] == "/dev/null"
    assert seen["sid"] == seen["pid"] != os.getsid(0)    # a session of its own
    assert seen["umask"] == 0o077 and os.umask(ours) == ours     # ours is left as it was
    assert seen["fds"] == [0, 1, 2, 3]                   # 3: the listing's own
    assert (seen["cwd"] == str(tmp_path)) == hook         # the hook ran in the child


@pytest.mark.parametrize("hook", [None, lambda: None])
def test_sigpipe_is_not_left_ignored(tmp_path, hook):
    """Python ignores SIGPIPE; a program it starts must not inherit that (grep reports its
    own ignored signals: no Python in the child)."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    with open(tmp_path / "log", "wb") as out:
        child = spawn.start(["grep", "^SigIgn", "/proc/self/status"], out.fileno(), 0o077,
                            before_exec=hook)
    assert child.wait(10) == 0
    ignored = int((tmp_path / "log").read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_return_codes_read_as_popen(tmp_path):
    with open(tmp_path / "log", "wb") as out:
        child = spawn.start(["sleep", "600"], out.fileno(), 0o077)
        done = spawn.start(["sh", "-c", "exit 3"], out.fileno(), 0o077)
    assert child.poll() is None
    with pytest.raises(TimeoutError):
        child.wait(0.1)
    child.kill()
    assert child.wait(10) == -signal.SIGKILL and child.pidfd == -1
    assert done.wait(10) == 3 and done.poll() == 3


@pytest.mark.parametrize("hook", [None, lambda: None])
def test_a_program_that_cannot_run(tmp_path, hook):
    before = set(os.listdir("/proc/self/task"))
    with open(tmp_path / "log", "wb") as out:
        with pytest.raises(FileNotFoundError):
            spawn.start([str(tmp_path / "no-such-program")], out.fileno(), 0o077,
                        before_exec=hook)
    with pytest.raises(ChildProcessError):               # no child left, not even a zombie
        os.waitpid(-1, os.WNOHANG)
    assert set(os.listdir("/proc/self/task")) == before


ADOPTER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from kvmrun.guest import spawn
    child = spawn.Child.adopt(int(sys.argv[2]))
    try:
        spawn.Child.adopt(1)
        stranger = "adopted"
    except ChildProcessError:
        stranger = "refused"
    print(json.dumps({"pid": os.getpid(), "code": child.wait(30), "stranger": stranger}))
""")

SPAWN_THEN_EXEC = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from kvmrun.guest import spawn
    with open(sys.argv[2], "wb") as out:
        child = spawn.start(["sh", "-c", "sleep 0.3; exit 7"], out.fileno(), 0o077)
    print(os.getpid(), flush=True)
    os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[3], sys.argv[1],
                              str(child.pid)])
""")


def test_a_child_is_adopted_across_exec(tmp_path):
    """The supervisor's hand-over (the supervisor `kvmrun start` forks execs a lean one in
    its place): a process spawns a child and execs a new interpreter, which adopts the
    child (its own, unreaped) and reaps its exit code; a process that is not its child
    is refused."""
    root = str(Path(spawn.__file__).resolve().parents[2])
    adopter = tmp_path / "adopter.py"
    adopter.write_text(ADOPTER)
    done = subprocess.run([sys.executable, "-I", "-c", SPAWN_THEN_EXEC, root,
                           str(tmp_path / "child.log"), str(adopter)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.splitlines()
    seen = json.loads(after)
    assert seen == {"pid": int(before), "code": 7, "stranger": "refused"}   # same process
