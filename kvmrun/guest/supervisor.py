"""The supervisor: one process per guest, QEMU's parent.

It launches QEMU from the run directory's launch.json, owns the events monitor (qmp.sock),
writes events.jsonl and state.json, notices readiness (QMP up, then the console pattern),
records why the guest ended, and exits with a code that says so. `kvmrun start` runs it
detached; `kvmrun run` runs it in the foreground (systemd, scripts), where SIGTERM/SIGINT
stop the guest through the shutdown ladder and sd_notify messages go to $NOTIFY_SOCKET.

It imports only the standard library and kvmrun's light modules, to stay small in memory.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvmrun import runtime
from kvmrun.errors import GuestError, QMPError
from kvmrun.qmp import QMPClient
from kvmrun.shutdown import GRACE, HARD_STAGES, RESEND, Ladder, open_pidfd
from kvmrun.systemd import current_unit

QMP_WAIT = 30.0          # seconds QEMU gets to open its monitor

# exit codes of the supervisor (and so of `kvmrun run` and the systemd unit)
EXIT_CLEAN = 0           # the guest powered off, or was stopped gracefully on request
EXIT_LAUNCH = 7          # QEMU failed to start
EXIT_CRASHED = 8         # QEMU died of a signal or exited with an error
EXIT_PANICKED = 9        # the guest kernel panicked
EXIT_ESCALATED = 10      # a stop had to escalate (QMP quit, SIGTERM, SIGKILL)
EXIT_KILLED = 11         # hard power-off on request (`kvmrun kill`)


def watch_file(path: Path) -> int | None:
    """An inotify fd that becomes readable when `path` is written (or None where inotify
    is unavailable: the caller then polls). ctypes, since the stdlib has no inotify."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(path), 0x00000002) < 0:   # IN_MODIFY
            os.close(fd)
            return None
        return fd
    except (OSError, AttributeError):
        return None


def notify(message: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET, if systemd gave us one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError:
        pass


def log(message: str) -> None:
    """One plain line per event on stderr (journal-friendly)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Supervisor:
    def __init__(self, guest: runtime.Guest, ready_fd: int | None, foreground: bool):
        self.guest = guest
        self.paths = guest.paths
        self.launch = guest.read_launch()
        self.ready_fd = ready_fd
        self.foreground = foreground
        self.proc: subprocess.Popen | None = None
        self.pidfd = -1
        self.qmp: QMPClient | None = None
        self.state: dict = {}
        self.shutdown_reason: str | None = None
        self.panicked = False
        self.ready_re = re.compile(self.launch["ready_console"]) if self.launch.get(
            "ready_console") else None
        self.ready = False
        self.console_seen = b""
        self.console_offset = 0
        self.stop_requested: str | None = None
        self.stage: str | None = None

    # ------------------------------------------------------------ reporting
    def report(self, event: str, **data) -> None:
        """Tell the waiting `kvmrun start` how far we got (one JSON line on the ready pipe)."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, (json.dumps({"event": event, **data}) + "\n").encode())
        except OSError:
            pass
        if event in ("ready", "failed", "ready-timeout"):
            os.close(self.ready_fd)
            self.ready_fd = None

    def save(self, **changes) -> None:
        self.state.update(changes)
        self.guest.write_state(self.state)

    # ------------------------------------------------------------ launch
    def start_qemu(self) -> bool:
        if self.foreground:       # a SIGTERM from now on stops the guest (loop() acts on it)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self.on_signal)
        argv = self.launch["argv"]
        qemu_log = open(self.paths.dir / "qemu.log", "wb")
        self.save(name=self.guest.name, state=runtime.STARTING, boot_id=runtime.boot_id(),
                  supervisor_pid=os.getpid(),
                  supervisor_starttime=runtime.proc_starttime(os.getpid()),
                  started_at=time.time(), argv=argv, summary=self.launch.get("summary", {}),
                  ended=None, ready=False, unit=current_unit())
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         umask=0o177)     # its sockets and logs: 0600
        except OSError as err:
            return self.launch_failed(f"cannot run {argv[0]}: {err.strerror}")
        finally:
            qemu_log.close()
        self.pidfd = open_pidfd(self.proc.pid)
        self.save(qemu_pid=self.proc.pid, qemu_starttime=runtime.proc_starttime(self.proc.pid))
        deadline = time.monotonic() + QMP_WAIT
        while True:
            if self.proc.poll() is not None:
                return self.launch_failed(f"QEMU exited with status {self.proc.returncode} "
                                          "while starting")
            try:
                self.qmp = QMPClient(self.paths.qmp, timeout=5).connect()
                break
            except (GuestError, QMPError):
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    return self.launch_failed(f"QEMU did not open its monitor within "
                                              f"{QMP_WAIT:g}s")
                select.poll().poll(10)
        running = self.qmp.execute("query-status").get("running")
        self.save(state=runtime.RUNNING if running else runtime.PAUSED)
        log(f"{self.guest.name}: QEMU running (pid {self.proc.pid}), QMP up")
        self.report("qmp", pid=self.proc.pid)
        if not self.ready_re:
            self.became_ready()
        return True

    def launch_failed(self, message: str) -> bool:
        stderr = ""
        try:
            stderr = (self.paths.dir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            pass
        log(f"{self.guest.name}: {message}: {stderr}")
        self.save(state=runtime.CRASHED, ended={"reason": "failed-to-start",
                                                "detail": message, "stderr": stderr,
                                                "at": time.time()})
        self.report("failed", message=message, stderr=stderr)
        return False

    def became_ready(self) -> None:
        self.ready = True
        self.save(ready=True, ready_at=time.time())
        self.report("ready")
        notify("READY=1\nSTATUS=guest running")
        log(f"{self.guest.name}: ready")

    # ------------------------------------------------------------ the loop
    def check_console(self) -> None:
        try:
            with open(self.paths.serial_log, "rb") as f:
                f.seek(self.console_offset)
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        self.console_offset += len(chunk)
        self.console_seen = (self.console_seen + chunk)[-65536:]
        if self.ready_re.search(self.console_seen.decode(errors="replace")):
            self.became_ready()

    def handle_event(self, event: dict) -> None:
        self.guest.append_event(event)
        name = event.get("event")
        if name == "STOP":
            self.save(state=runtime.PAUSED)
        elif name == "RESUME":
            self.save(state=runtime.RUNNING)
        elif name == "SHUTDOWN":
            self.shutdown_reason = event.get("data", {}).get("reason")
            notify("STOPPING=1\nSTATUS=guest shutting down")
            log(f"{self.guest.name}: SHUTDOWN ({self.shutdown_reason})")
        elif name == "GUEST_PANICKED":
            self.panicked = True
            log(f"{self.guest.name}: guest panicked")
        elif name == "RESET":
            log(f"{self.guest.name}: reset")
            if self.ready_re and self.ready:    # rebooting: ready again when the console says so
                self.ready = False
                self.console_seen = b""
                self.save(ready=False)

    def drain_events(self) -> None:
        while self.qmp:
            try:
                event = self.qmp.read_event(0.05)
            except (EOFError, OSError, ValueError):
                self.qmp.close()
                self.qmp = None
                return
            if event is None:
                return
            self.handle_event(event)

    def loop(self) -> None:
        ready_deadline = time.monotonic() + self.launch.get("ready_timeout", 300)
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6 / 2
        next_ping = time.monotonic() + watchdog if watchdog else None
        sigfd = None
        if self.foreground:
            rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(wfd)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self.on_signal)
            sigfd = rfd
        console_fd = watch_file(self.paths.serial_log) if self.ready_re else None
        while True:
            waits = [60.0]
            if not self.ready:
                # the console log wakes us through inotify; without it, poll it at 20 Hz
                waits.append(0.05 if console_fd is None else
                             max(0.0, ready_deadline - time.monotonic()))
            if next_ping:
                waits.append(max(0.0, next_ping - time.monotonic()))
            fds = [self.pidfd] + ([self.qmp.fileno()] if self.qmp else []) + (
                [sigfd] if sigfd is not None else []) + (
                [console_fd] if console_fd is not None and not self.ready else [])
            readable, _, _ = select.select(fds, [], [], min(waits))
            if console_fd in readable:
                try:
                    os.read(console_fd, 65536)
                except BlockingIOError:
                    pass
            if self.qmp and self.qmp.fileno() in readable:
                self.drain_events()
            if sigfd in readable:
                os.read(sigfd, 512)
            if self.stop_requested:
                self.stop_on_signal()
            if self.pidfd in readable:
                return
            if not self.ready:
                self.check_console()
                if not self.ready and time.monotonic() > ready_deadline:
                    self.report("ready-timeout")
                    ready_deadline = float("inf")
            if next_ping and time.monotonic() >= next_ping:
                self.watchdog_ping()
                next_ping = time.monotonic() + watchdog

    def watchdog_ping(self) -> None:
        if not self.qmp:
            return
        try:
            self.qmp.execute("query-status", timeout=2)
        except QMPError:
            log(f"{self.guest.name}: QMP did not answer; no watchdog ping")
            return
        for event in self.qmp.pending_events:
            self.handle_event(event)
        self.qmp.pending_events.clear()
        notify("WATCHDOG=1")

    def on_signal(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name

    def stop_on_signal(self) -> None:
        """SIGTERM/SIGINT in the foreground: the graceful ladder, escalating on timeout."""
        by = self.stop_requested
        self.stop_requested = None
        if self.stage:
            return                          # already stopping
        timeout = float(self.launch.get("shutdown_timeout", 60))
        notify(f"STOPPING=1\nSTATUS=stopping the guest ({by})")
        notify(f"EXTEND_TIMEOUT_USEC={int((timeout + 2 * GRACE + 35) * 1e6)}")
        log(f"{self.guest.name}: {by}: stopping the guest (timeout {timeout:g}s)")
        self.guest.set_request("stop", by)
        self.stage = "requested"

        def send(command: str) -> None:
            if self.qmp:
                try:
                    self.qmp.execute(command, timeout=2)
                except QMPError:
                    pass

        ladder = Ladder(self.pidfd, send, method=self.launch.get("shutdown_method", "acpi"),
                        console_sock=str(self.paths.console), qga_sock=str(self.paths.qga),
                        command=self.launch.get("shutdown_command", "poweroff"),
                        progress=self.stop_progress)
        self.stage = ladder.run(timeout, force=True)
        request = self.guest.request() or {"action": "stop", "by": by}
        runtime.atomic_write(self.paths.dir / "request.json",
                             json.dumps({**request, "stage": self.stage}))

    def stop_progress(self, stage: str, message: str) -> None:
        """Each step of the ladder: a log line, and more time from systemd while the
        shutdown is still making progress."""
        log(f"{self.guest.name}: {message}")
        notify(f"STATUS={message}")
        notify(f"EXTEND_TIMEOUT_USEC={int((RESEND + 2 * GRACE + 30 + 5) * 1e6)}")

    # ------------------------------------------------------------ the end
    def finish(self) -> int:
        assert self.proc is not None
        returncode = self.proc.wait()
        self.drain_events()
        request = self.guest.request() or {}
        ended, code = classify(returncode, self.shutdown_reason, self.panicked, request)
        ended["at"] = time.time()
        ended["exit_status"] = returncode
        if ended["reason"] in ("crashed", "qemu-error"):
            try:
                ended["stderr"] = (self.paths.dir / "qemu.log").read_text(
                    errors="replace").strip()[-2000:]
            except OSError:
                pass
        state = runtime.CRASHED if ended["reason"] in ("crashed", "qemu-error",
                                                        "panicked") else runtime.STOPPED
        self.save(state=state, ended=ended, supervisor_exit=code)
        self.guest.clear_runtime()
        from kvmrun import network       # only at the end: importing it costs ~5 MiB per guest
        network.teardown(self.paths)
        log(f"{self.guest.name}: ended: {ended['detail']}")
        notify(f"STATUS=guest ended: {ended['detail']}")
        return code

    def run(self) -> int:
        try:
            if not self.start_qemu():
                self.guest.clear_runtime()
                from kvmrun import network
                network.teardown(self.paths)
                return EXIT_LAUNCH
            self.loop()
            return self.finish()
        finally:
            if self.ready_fd is not None:
                os.close(self.ready_fd)


def classify(returncode: int, shutdown_reason: str | None, panicked: bool,
             request: dict) -> tuple[dict, int]:
    """Why the guest ended, from QEMU's exit status, the last SHUTDOWN event and what a
    kvmrun command asked for. Returns (ended record, supervisor exit code)."""
    action, by, stage = request.get("action"), request.get("by", "kvmrun"), request.get("stage")
    base = {"shutdown_reason": shutdown_reason}
    if panicked:
        return {**base, "reason": "panicked", "detail": "the guest kernel panicked"}, EXIT_PANICKED
    if action == "kill":
        return {**base, "reason": "killed", "by": by,
                "detail": f"powered off hard by {by}"}, EXIT_KILLED
    if action == "stop":
        if stage in HARD_STAGES:
            return {**base, "reason": "stopped", "by": by, "stage": stage,
                    "detail": f"stopped by {by}, escalated to {stage}"}, EXIT_ESCALATED
        return {**base, "reason": "stopped", "by": by, "stage": stage or "acpi",
                "detail": f"stopped by {by}: the guest powered off"}, EXIT_CLEAN
    if shutdown_reason == "guest-shutdown" and returncode == 0:
        return {**base, "reason": "guest-shutdown",
                "detail": "the guest powered itself off"}, EXIT_CLEAN
    if returncode < 0:
        sig = -returncode
        return {**base, "reason": "crashed", "signal": sig,
                "detail": f"QEMU was killed by signal {sig} ({signal.Signals(sig).name})"
                }, EXIT_CRASHED
    if returncode != 0:
        return {**base, "reason": "qemu-error",
                "detail": f"QEMU exited with status {returncode}"}, EXIT_CRASHED
    detail = {"host-qmp-quit": "QMP quit from outside kvmrun",
              "host-signal": "QEMU got a signal from outside kvmrun"}.get(
                  shutdown_reason or "", f"QEMU exited ({shutdown_reason or 'no reason given'})")
    return {**base, "reason": "stopped", "by": "outside", "detail": detail}, EXIT_CLEAN


USAGE = "usage: python -m kvmrun.supervisor NAME --run-dir DIR [--ready-fd FD] [--foreground]"


def main(argv: list[str] | None = None) -> int:
    """Started by kvmrun only; parses its few arguments by hand (argparse would cost memory
    in every guest's supervisor)."""
    args = list(sys.argv[1:] if argv is None else argv)
    name, run_dir, ready_fd, foreground = None, None, None, False
    try:
        while args:
            arg = args.pop(0)
            if arg == "--run-dir":
                run_dir = args.pop(0)
            elif arg == "--ready-fd":
                ready_fd = int(args.pop(0))
            elif arg == "--foreground":
                foreground = True
            elif name is None and not arg.startswith("-"):
                name = arg
            else:
                raise ValueError(arg)
    except (IndexError, ValueError):
        name = None
    if name is None or run_dir is None:
        sys.stderr.write(USAGE + "\n")
        return 2
    guest = runtime.Guest(name, Path(run_dir))
    return Supervisor(guest, ready_fd, foreground).run()


if __name__ == "__main__":
    sys.exit(main())
