"""A guest's helper daemons: the processes QEMU connects to at start-up (virtiofsd for a
virtiofs share, swtpm for a TPM), one per need, run by the guest's supervisor.

The launch record lists them (`helpers`: [{name, argv, socket}], made by the pure compile
step, kvmrun.qemu.compile). The supervisor enters each into its ExitStack before QEMU starts:
`Helper.__enter__` starts the process (stdin /dev/null, stdout and stderr to
`helper-NAME.log` in the run directory, its own session, umask 077) and waits, bounded, until
it listens on its socket; a helper that exits first, or does not listen in time, is a
`HelperFailed` naming the helper, its program and its log, and the helpers already started
are ended (no half-started guest). After QEMU exits, the stack ends them in reverse order:
SIGTERM, then SIGKILL after STOP_GRACE seconds.

Listening is read from /proc/net/unix (the socket's __SO_ACCEPTCON flag) rather than by
connecting: virtiofsd and swtpm serve one connection each, and swtpm --terminate ends when
its control connection closes, so a probe connection would cost the guest its helper.

Standard library and kvmrun's light modules only: the supervisor imports it.
"""

from __future__ import annotations

import os
import select
import signal
import stat
from pathlib import Path

from kvmrun import files, proc
from kvmrun.guest import spawn

HELPER_WAIT = 30.0       # seconds a helper gets to listen on its socket
STOP_GRACE = 5.0         # seconds between SIGTERM and SIGKILL when a helper is ended
POLL_MS = 20
ACCEPTCON = 0x10000      # /proc/net/unix Flags: a listening socket


class HelperFailed(Exception):
    """A helper did not come up; `log` is where its output went, `output` its tail."""

    def __init__(self, message: str, log: Path, output: str = "", argv: list[str] = ()):
        super().__init__(message)
        self.log = log
        self.output = output
        self.argv = list(argv)


def listening(path: Path) -> bool:
    """Whether a unix socket bound at `path` is listening (without connecting to it).
    Where /proc/net/unix cannot be read, a socket file at `path` counts."""
    try:
        with open("/proc/net/unix") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            return False
    want = str(path)
    for row in rows:
        fields = row.split()
        if len(fields) >= 8 and fields[7] == want and int(fields[3], 16) & ACCEPTCON:
            return True
    return False


class Helper:
    """One helper process, as a context manager: started and listening on enter, ended on
    exit."""

    def __init__(self, name: str, argv: list[str], socket: str, log: Path,
                 wait: float = HELPER_WAIT):
        self.name = name
        self.argv = list(argv)
        self.socket = Path(socket)
        self.log = Path(log)
        self.wait = wait
        self.proc: spawn.Child | None = None      # once started

    @property
    def what(self) -> str:
        return f"helper {self.name} ({os.path.basename(self.argv[0])})"

    def record(self) -> dict:
        """What state.json keeps of a running helper (kvmrun.guest.ending ends it when the
        supervisor is gone)."""
        pid = self.proc.pid if self.proc else None
        return {"name": self.name, "pid": pid, "starttime": proc.starttime(pid) if pid else None,
                "socket": str(self.socket), "log": str(self.log)}

    def __enter__(self) -> "Helper":
        files.unlink(self.socket)                 # a stale socket must not count as up
        proc.log_argv(self.argv)
        try:
            with files.open_private(self.log, "wb") as out:
                self.proc = spawn.start(self.argv, out.fileno(), umask=0o077)
        except OSError as err:
            raise HelperFailed(f"cannot run {self.what}: {err.strerror}", self.log,
                               argv=self.argv) from None
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        poller = select.poll()
        poller.register(self.proc.pidfd, select.POLLIN)
        for _ in range(max(1, int(self.wait * 1000 / POLL_MS))):
            if listening(self.socket):
                return
            if poller.poll(POLL_MS):          # it exited
                status = self.proc.wait()
                raise HelperFailed(f"{self.what} exited with status {status} while "
                                   f"starting; its log: {self.log}", self.log,
                                   self.output(), self.argv)
        if listening(self.socket):
            return
        raise HelperFailed(f"{self.what} did not listen on {self.socket} within "
                           f"{self.wait:g}s; its log: {self.log}", self.log, self.output(),
                           self.argv)

    def output(self) -> str:
        return files.read_text(self.log).strip()[-2000:]

    def stop(self) -> int | None:
        """End the helper (SIGTERM, then SIGKILL); its exit status, None if never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except TimeoutError:
                self.proc.kill()
        status = self.proc.wait()
        files.unlink(self.socket)
        return status

    def __exit__(self, *exc) -> None:
        self.stop()


def end_recorded(records: list) -> None:
    """End the helpers a state record lists, each only if it is still that very process
    (pid and start time): for a guest whose supervisor died before it could."""
    for record in records or []:
        if isinstance(record, dict) and proc.identified(record.get("pid"),
                                                        record.get("starttime")):
            proc.terminate(record["pid"], STOP_GRACE)
