"""Starting and reaping the supervisor's children (QEMU, the helper daemons) without
`subprocess`: with it come threading, selectors, locale and warnings, ~2 MiB in every
guest's supervisor.

`start()` runs a program with stdin from /dev/null, stdout and stderr into a log file, in a
session of its own (setsid), under a given umask, with SIGPIPE and SIGXFSZ back to their
defaults and no signal blocked (Python ignores SIGPIPE; an exec'd program would inherit
that), and only descriptors 0-2 open: every other descriptor of the supervisor is
close-on-exec (Python opens them so; `seal_fds` marks what was inherited). It uses
posix_spawn (glibc: a vfork, and an exec failure comes back as an OSError), or fork+exec
when something must run between the two (`before_exec`: moving QEMU into its cgroup), where
an exec failure comes back through a close-on-exec pipe. Either way nothing is left behind
when it fails. The `Child` it returns holds a pidfd, opened while the child is unreaped (so
it names that very process), for sleeping on its exit and for signals; `wait`/`poll` reap
it with waitpid, and the return code reads as Popen's (negative: killed by that signal).

Standard library only: the supervisor imports it.
"""

from __future__ import annotations

import os
import select
import signal

DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Child:
    """A started child process: `pid`, `pidfd`, and `returncode` once reaped."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:                   # (a kernel without pidfds): not left running;
            os.kill(pid, signal.SIGKILL)  # unreaped, the PID cannot name another process
            os.waitpid(pid, 0)
            raise
        self.returncode: int | None = None

    @classmethod
    def adopt(cls, pid: int) -> "Child":
        """A child this process started before it exec'd itself (the supervisor's hand-over):
        ChildProcessError unless `pid` is an unreaped child of ours, which it cannot stop
        being, so its pidfd names that very process."""
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; TimeoutError if it still runs after `timeout` seconds."""
        if self.returncode is None:
            if timeout is not None:
                poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
                if not poller.poll(max(0, int(timeout * 1000))):
                    raise TimeoutError(f"process {self.pid} still runs")
            self._reaped(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass                          # exited, not reaped yet

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self.pidfd)
        self.pidfd = -1


def seal_fds(keep: tuple[int, ...] = ()) -> None:
    """Mark every descriptor above 2 (but `keep`) close-on-exec: what a process inherited
    (say a pipe end passed to it) must not reach its children."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass                          # the listing's own descriptor, now closed


def start(argv: list[str], log_fd: int, umask: int, before_exec=None) -> Child:
    """`argv` started as described above, its output into `log_fd` (an open descriptor
    of the supervisor's). OSError when it cannot be run."""
    if before_exec is not None:
        return Child(_fork_exec(argv, log_fd, umask, before_exec))
    old = os.umask(umask)          # inherited by the child (the supervisor is one thread)
    try:
        pid = os.posix_spawnp(
            argv[0], argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)],
            setsid=True, setsigmask=(), setsigdef=DEFAULT_SIGNALS)
    finally:
        os.umask(old)
    return Child(pid)


def _fork_exec(argv: list[str], log_fd: int, umask: int, before_exec) -> int:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:                           # the child: only plain calls, then exec
        try:
            os.setsid()
            os.umask(umask)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            for sig in DEFAULT_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            before_exec()
            os.execvp(argv[0], argv)
        except BaseException as err:
            message = f"{getattr(err, 'errno', 0) or 0}:{getattr(err, 'strerror', 0) or err}"
            try:
                os.write(wfd, message.encode(errors="replace"))
            finally:
                os._exit(127)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        failed = pipe.read()                 # EOF at the exec (close-on-exec), or why not
    if failed:
        os.waitpid(pid, 0)
        code, _, text = failed.decode(errors="replace").partition(":")
        raise OSError(int(code) if code.isdigit() else 0, text)
    return pid
