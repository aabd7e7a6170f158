"""The source's one session with the target of a live migration (kvmrun.ops.migrate): a
single `ssh HOST kvmrun migrate-target session`, held open for the whole migration, that
carries every step there (prepare, finish, abort: a JSON line each way) and the target's dead
man's switch (a line "alive" every 2 s; "done" ends it; EOF or silence makes the target
remove what it made by itself, kvmrun.ops.migrate_target.session).

One remote interpreter for the whole migration, started before the source's own work, not
one per step: each step's start-up (the remote kvmrun's imports) was on the migration's
critical path twice (bench/migrate.py)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time

from kvmrun.errors import MigrationError
from kvmrun.ops import remote

BEAT = 2.0


class Lost(MigrationError):
    """The session ended (ssh or the remote kvmrun is gone) before the step's answer came.
    `sent`: whether the request was handed to ssh, so it may have run there."""

    def __init__(self, message: str, sent: bool, **kw) -> None:
        super().__init__(message, **kw)
        self.sent = sent


class Session:
    def __init__(self, host: remote.Host, name: str) -> None:
        self.host, self.name = host, name
        argv = remote.ssh_argv(host, remote.kvmrun_words(["migrate-target", "session"]))
        self.proc = remote.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, preexec_fn=remote.ignore_sigint)
        self.relay = remote.Relay(self.proc.stderr, relay=False)
        self.relay.start()
        self.lock = threading.Lock()
        self.buffer = b""
        self.stop = threading.Event()
        self._write(json.dumps({"name": name}).encode() + b"\n")
        threading.Thread(target=self._beat, daemon=True).start()

    def _write(self, data: bytes) -> bool:
        with self.lock:
            try:
                os.write(self.proc.stdin.fileno(), data)
                return True
            except (OSError, ValueError):
                return False

    def _beat(self) -> None:
        while not self.stop.wait(BEAT):
            if not self._write(b"alive\n"):
                return

    def call(self, step: str, request: dict, timeout: float = 300) -> dict:
        """Run `step` there; its answer. MigrationError with the target's message when the
        step failed there, Lost when the session ended before the answer."""
        if self.proc.poll() is not None or not self._write(
                json.dumps({"step": step, **request}).encode() + b"\n"):
            raise Lost(self._why(f"{step} on {self.host}"), sent=False)
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Lost(f"{step} on {self.host} did not answer within {timeout:g} s",
                           sent=True)
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise Lost(self._why(f"{step} on {self.host}"), sent=True)
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        answer = json.loads(line)
        if "error" in answer:
            raise MigrationError(f"{step} on {self.host} failed: {answer['error']}",
                                 hint=answer.get("hint"))
        return answer["result"]

    def _why(self, what: str) -> str:
        """Why the session is gone: ssh's own line, the remote's last word, or its exit."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self.relay.join(2)
        failure = remote.failure_of(self.host, code, self.relay,
                                    " ".join(remote.remote_command())) if code else None
        said = [line.strip() for line in self.relay.lines if line.strip()]
        reason = failure.message if failure else (
            said[-1].removeprefix("kvmrun: error: ") if said
            else f"the session ended (exit status {code})")
        return f"{what}: {reason}"

    def end(self, done: bool) -> None:
        self.close(done)
        self.wait(done)

    def close(self, done: bool) -> None:
        """Close the session: with `done` the target keeps what it made; without, EOF makes
        it remove all of it by itself (it does not wait for us)."""
        self.stop.set()
        if done:
            self._write(b"done\n")
        with self.lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait(self, done: bool) -> None:
        try:
            self.proc.wait(30 if done else 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.relay.join(2)
