"""The supervisor: one process per guest, QEMU's parent.

It starts the guest's helper daemons (virtiofsd, swtpm: kvmrun.guest.helpers) and then QEMU
from the run directory's launch record, owns the events monitor (qmp.sock), writes
events.jsonl and state.json, notices readiness (QMP up, then the console pattern), records
why the guest ended, ends the helpers after QEMU, and exits with a code that says so
(kvmrun.guest.ending).
`kvmrun start` runs it detached, as a fork of itself (kvmrun.ops.quickstart.fork_supervisor)
that execs a lean interpreter of its own (`command()`) in its own place once QEMU is spawned
and hands QEMU over to it (`--adopt`); a migration's target starts that interpreter
directly. `kvmrun run` runs it in the foreground
(systemd, scripts), where SIGTERM/SIGINT stop the guest through the shutdown ladder and
sd_notify messages go to $NOTIFY_SOCKET. With `--incoming` it is the
target of a live migration (kvmrun.ops.migrate): QEMU waits for the migration stream, the
console will not print its ready pattern again, and the guest is ready when it resumes.

Standard library and kvmrun's light modules only, to stay small in memory.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

from kvmrun import files, proc
from kvmrun.errors import GuestError, QMPError
from kvmrun.guest import exits, spawn
from kvmrun.guest.notify import current_unit, log, notify, watch_dir
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest, State
from kvmrun.guest.shutdown import GRACE, RESEND, Ladder

# Imported where used, not here: the QMP client once QEMU is spawned (a quick start spawns
# it sooner); the helpers, cgroups, log rotation and the end's clean-up only by the guests
# and at the moments that need them (each is memory in every supervisor).

QMP_WAIT = 30.0          # seconds QEMU gets to open its monitor
INF = float("inf")
LOG_CHECK = 2.0          # at most this often serial.log's size is looked at, after writes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Phase(str, enum.Enum):
    """Where the supervisor is: one field instead of flags."""

    STARTING = "starting"        # QEMU launched, its monitor not up yet
    BOOTING = "booting"          # QMP up; waiting for the console's ready pattern
    READY = "ready"              # the guest counts as ready
    STOPPING = "stopping"        # the shutdown ladder runs (foreground stop on a signal)
    ENDED = "ended"


class Supervisor:
    def __init__(self, guest: Guest, ready_fd: int | None, foreground: bool,
                 incoming: bool = False, handover: bool = False, adopt: int | None = None):
        """`handover`: once QEMU is spawned, exec a lean supervisor in this process's place
        (`kvmrun start` forks the supervisor, which would keep its pages); `adopt`: that
        lean supervisor, taking over QEMU (this PID) and the helpers."""
        self.guest = guest
        self.handover = handover
        self.adopt = adopt
        self.paths = guest.paths
        self.launch = guest.read_launch()
        self.ready_fd = ready_fd
        self.foreground = foreground
        self.proc: spawn.Child | None = None
        self.qmp = None                           # a QMPClient once QEMU's monitor is up
        self.state: dict = {}
        self.phase = Phase.STARTING
        self.shutdown_reason: str | None = None
        self.panicked = False
        self.incoming = incoming
        self.ready_re: re.Pattern | None = None    # compiled once QEMU is spawned (qemu_up)
        self.console_seen = b""
        self.console_offset = 0
        self.stop_requested: str | None = None
        self.helpers = contextlib.ExitStack()     # ended after QEMU, in reverse order

    @property
    def pidfd(self) -> int:
        """QEMU's pidfd (-1 before its start and once it is reaped)."""
        return self.proc.pidfd if self.proc else -1

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

    def owns_run(self) -> bool:
        """Whether the run directory is still this start's (launch.json carries our run
        id): a supervisor never overwrites or clears another start's guest."""
        if self.launch.run_id is None:
            return True                         # a record from before run ids
        try:
            recorded = LaunchRecord.read(self.paths.launch).run_id
        except (OSError, ValueError):
            return False
        return recorded in (None, self.launch.run_id)   # None: no newer start wrote it

    def save(self, **changes) -> None:
        self.state.update(changes, run_id=self.launch.run_id)
        if not self.owns_run():
            log(f"{self.guest.name}: the run directory belongs to another start; "
                "not writing its state")
            return
        try:
            self.guest.write_state(self.state)
        except OSError as err:          # a full run directory: keep supervising the guest
            log(f"{self.guest.name}: cannot write {self.paths.state}: {err.strerror}")

    # ------------------------------------------------------------ launch
    def start_qemu(self) -> bool:
        if self.foreground:       # a SIGTERM from now on stops the guest (loop() acts on it)
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.on_signal)
        argv = self.launch.argv
        me = os.getpid()
        self.save(name=self.guest.name, state=State.STARTING, boot_id=proc.boot_id(),
                  supervisor_pid=me, supervisor_starttime=proc.starttime(me),
                  started_at=time.time(), argv=argv, summary=self.launch.summary,
                  ended=None, ready=False, unit=current_unit())
        spawn.seal_fds()                    # nothing of ours (the ready pipe) reaches QEMU
        if self.launch.helpers and not self.start_helpers():
            return False
        argv = argv + exits.TRACE_ARGS      # QEMU logs its shutdown cause (status reads it
        where = self.launch.cgroup or {}    # when no supervisor saw the end)
        enter = None
        if where.get("scope"):               # systemd-run --scope execs QEMU in place
            argv = list(where["scope"]) + argv
        elif where.get("leaf"):              # into the guest's cgroup before exec
            from kvmrun.guest import cgroup
            enter = lambda: cgroup.enter(where["leaf"])   # noqa: E731
        proc.log_argv(argv)
        try:
            with files.open_private(self.paths.qemu_log, "wb") as qemu_log:
                self.proc = spawn.start(argv, qemu_log.fileno(), umask=0o177,  # its sockets
                                        before_exec=enter)                    # and logs: 0600
        except OSError as err:
            return self.launch_failed(f"cannot run {argv[0]}: {err.strerror}")
        self.save(qemu_pid=self.proc.pid, qemu_starttime=proc.starttime(self.proc.pid))
        if self.handover:
            self.exec_lean()                # returns only when that is not possible
        return self.qemu_up()

    def qemu_up(self) -> bool:
        """QEMU is spawned: its monitor, its first state, the news for `kvmrun start`."""
        if self.launch.ready_console and not self.incoming:
            self.ready_re = re.compile(self.launch.ready_console)
        if not self.connect_qmp():
            return False
        running = self.qmp.execute("query-status").get("running")
        self.save(state=State.RUNNING if running else State.PAUSED)
        log(f"{self.guest.name}: QEMU running (pid {self.proc.pid}), QMP up")
        self.phase = Phase.BOOTING
        self.report("qmp", pid=self.proc.pid)
        if not self.ready_re and not self.incoming:
            self.became_ready()
        return True

    def exec_lean(self) -> None:
        """Hand this supervisor over to a lean interpreter of its own (`command`), in this
        process: QEMU and the helpers stay its children, the ready pipe stays open, and
        state.json (already written) tells it the rest. Not when state.json could not be
        written: then this process supervises on, only heavier."""
        on_disk = self.guest.read_state() or {}
        if any(on_disk.get(key) != self.state.get(key)
               for key in ("run_id", "qemu_pid", "qemu_starttime", "helpers")):
            return
        extra = ["--adopt", str(self.proc.pid)]
        if self.ready_fd is not None:
            os.set_inheritable(self.ready_fd, True)
            extra += ["--ready-fd", str(self.ready_fd)]
        argv = command(self.guest.name, self.paths.dir.parent, *extra)
        try:
            os.execv(argv[0], argv)
        except OSError as err:
            log(f"{self.guest.name}: cannot exec a lean supervisor ({err.strerror}); "
                "this one goes on")
            if self.ready_fd is not None:
                os.set_inheritable(self.ready_fd, False)

    def take_over(self) -> bool:
        """The lean supervisor of a hand-over: QEMU (pid `adopt`) and the helpers that the
        state records are this process's children already."""
        from kvmrun.guest.helpers import Helper
        self.proc = spawn.Child.adopt(self.adopt)
        self.state = self.guest.read_state() or {}
        if self.state.get("qemu_pid") != self.adopt or not self.owns_run():
            self.proc.kill()          # exec_lean checked this before it exec'd: not seen
            self.proc.wait()
            return self.launch_failed(f"the hand-over found no record of QEMU pid "
                                      f"{self.adopt} in {self.paths.state}")
        for spec, record in zip(self.launch.helpers, self.state.get("helpers") or []):
            helper = Helper(spec["name"], spec["argv"], spec["socket"],
                            self.paths.helper_log(spec["name"]))
            helper.proc = spawn.Child.adopt(record["pid"])
            self.helpers.push(helper)
        return self.qemu_up()

    def start_helpers(self) -> bool:
        """Each helper of the launch record, started and listening, before QEMU (which
        connects to their sockets as it starts); on a failure the ones started are ended."""
        from kvmrun.guest.helpers import Helper, HelperFailed
        started = []
        try:
            for spec in self.launch.helpers:
                helper = Helper(spec["name"], spec["argv"], spec["socket"],
                                self.paths.helper_log(spec["name"]))
                started.append(self.helpers.enter_context(helper))
                log(f"{self.guest.name}: {helper.what} up (pid {helper.proc.pid})")
        except HelperFailed as err:
            return self.launch_failed(str(err), err.output, helper=err.argv)
        if started:
            self.save(helpers=[h.record() for h in started])
        return True

    def end_helpers(self) -> None:
        """End the helpers (after QEMU has exited, or when it failed to start)."""
        self.helpers.close()

    def connect_qmp(self) -> bool:
        from kvmrun.guest.qmp import QMPClient
        deadline = time.monotonic() + QMP_WAIT
        while True:
            if self.proc.poll() is not None:
                return self.launch_failed(f"QEMU exited with status {self.proc.returncode} "
                                          "while starting")
            try:
                self.qmp = QMPClient(self.paths.qmp, timeout=5).connect()
                return True
            except (GuestError, QMPError):
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    return self.launch_failed(f"QEMU did not open its monitor within "
                                              f"{QMP_WAIT:g}s")
                select.poll().poll(10)

    def launch_failed(self, message: str, stderr: str | None = None,
                      helper: list[str] | None = None) -> bool:
        """A start that did not come up: its helpers ended, the failure recorded (`helper`:
        the argv of the helper that failed, when it was not QEMU)."""
        self.end_helpers()
        if stderr is None:
            stderr = files.read_text(self.paths.qemu_log).strip()
        log(f"{self.guest.name}: {message}: {stderr}")
        self.save(ended={"reason": "failed-to-start", "detail": message, "stderr": stderr,
                         **({"helper_argv": helper} if helper else {})})
        self.report("failed", message=message, stderr=stderr,
                    **({"helper_argv": helper} if helper else {}))
        return False

    def became_ready(self) -> None:
        self.phase = Phase.READY
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
        try:
            self.guest.append_event(event)
        except OSError:
            pass                          # a full run directory loses the event, not the guest
        name = event.get("event")
        if name == "STOP":
            self.save(state=State.PAUSED)
        elif name == "RESUME":
            self.save(state=State.RUNNING)
            if self.incoming:                 # the migrated guest runs here now
                self.incoming = False
                self.became_ready()
        elif name == "SHUTDOWN":
            self.shutdown_reason = event.get("data", {}).get("reason")
            notify("STOPPING=1\nSTATUS=guest shutting down")
            log(f"{self.guest.name}: SHUTDOWN ({self.shutdown_reason})")
        elif name == "GUEST_PANICKED":
            self.panicked = True
            log(f"{self.guest.name}: guest panicked")
        elif name == "RESET":
            log(f"{self.guest.name}: reset")
            if self.ready_re and self.phase is Phase.READY:   # ready again when it says so
                self.phase = Phase.BOOTING
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

    def wakeup_fd(self) -> int:
        """The pipe every handled signal writes its number to (signal.set_wakeup_fd): the
        stop signals in the foreground, and SIGIO, which the console log's directory
        watch (dnotify) sends whenever a file there is written."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        signal.signal(signal.SIGIO, lambda signum, frame: None)
        if self.foreground:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self.on_signal)
        return rfd

    def loop(self) -> None:
        """Sleep until something happens: QEMU exits, QMP sends an event, a signal, the
        console log is written (dnotify: the ready pattern, and the log's size for
        rotation at most every LOG_CHECK s), the ready deadline, the watchdog. An idle guest
        whose console is quiet wakes the supervisor for nothing."""
        ready_deadline = time.monotonic() + self.launch.ready_timeout
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6 / 2
        next_ping = time.monotonic() + watchdog if watchdog else None
        next_log_check, log_written = time.monotonic(), False
        sigfd = self.wakeup_fd()
        watch = watch_dir(self.paths.dir)          # kept open: SIGIO when the log grows
        poll_log = watch is None and self.paths.serial_log.exists()   # no dnotify here
        while True:
            booting = self.phase is Phase.BOOTING and self.ready_re is not None
            waits: list[float] = []
            if booting:              # without dnotify, the console is polled at 20 Hz
                waits.append(0.05 if watch is None else
                             max(0.0, ready_deadline - time.monotonic()))
            if next_ping:
                waits.append(max(0.0, next_ping - time.monotonic()))
            if log_written or poll_log:
                waits.append(max(0.0, next_log_check - time.monotonic()))
            fds = [fd for fd in (self.pidfd, self.qmp.fileno() if self.qmp else None, sigfd)
                   if fd is not None]
            timeout = min(waits, default=None)
            readable, _, _ = select.select(
                fds, [], [], None if timeout in (None, INF) else timeout)
            if sigfd in readable:
                try:
                    if signal.SIGIO in os.read(sigfd, 512):
                        log_written = True
                except BlockingIOError:
                    pass
            if self.qmp and self.qmp.fileno() in readable:
                self.drain_events()
            if self.stop_requested:
                self.stop_on_signal()
            if self.pidfd in readable:
                return
            if self.phase is Phase.BOOTING and self.ready_re:
                self.check_console()
                if self.phase is Phase.BOOTING and time.monotonic() > ready_deadline:
                    self.report("ready-timeout")
                    ready_deadline = INF
            if (log_written or poll_log) and time.monotonic() >= next_log_check:
                self.rotate_log()
                next_log_check, log_written = time.monotonic() + LOG_CHECK, False
            if next_ping and time.monotonic() >= next_ping:
                self.watchdog_ping()
                next_ping = time.monotonic() + watchdog

    def rotate_log(self) -> None:
        from kvmrun.guest import serial_log
        if serial_log.rotate(self.paths, self.launch.serial_log_max):
            self.console_offset = 0          # the ready check reads the new file from 0
            log(f"{self.guest.name}: serial.log reached {self.launch.serial_log_max} "
                "bytes: rotated")

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
        if self.phase is Phase.STOPPING:
            return                          # already stopping
        self.phase = Phase.STOPPING
        timeout = float(self.launch.shutdown_timeout)
        notify(f"STOPPING=1\nSTATUS=stopping the guest ({by})")
        notify(f"EXTEND_TIMEOUT_USEC={int((timeout + 2 * GRACE + 35) * 1e6)}")
        log(f"{self.guest.name}: {by}: stopping the guest (timeout {timeout:g}s)")
        self.guest.try_request("stop", by)

        def send(command: str) -> None:
            if self.qmp:
                try:
                    self.qmp.execute(command, timeout=2)
                except QMPError:
                    pass

        ladder = Ladder(self.pidfd, send, method=self.launch.shutdown_method,
                        console_sock=str(self.paths.console), qga_sock=str(self.paths.qga),
                        command=self.launch.shutdown_command, progress=self.stop_progress)
        self.guest.try_request("stop", by, stage=ladder.run(timeout, force=True))

    def stop_progress(self, stage: str, message: str) -> None:
        """Each step of the ladder: a log line, and more time from systemd while the
        shutdown is still making progress."""
        log(f"{self.guest.name}: {message}")
        notify(f"STATUS={message}")
        notify(f"EXTEND_TIMEOUT_USEC={int((RESEND + 2 * GRACE + 30 + 5) * 1e6)}")

    # ------------------------------------------------------------ the end
    def finish(self) -> int:
        """How QEMU ended, recorded once; then the guest's run-time files and network go."""
        from kvmrun.guest import ending
        assert self.proc is not None
        returncode = self.proc.wait()
        self.end_helpers()
        self.drain_events()
        ended, code = exits.classify(returncode, self.shutdown_reason, self.panicked,
                                      self.guest.request() or {})
        ended["exit_status"] = returncode
        if ended["reason"] in ("crashed", "qemu-error"):
            ended["stderr"] = files.read_text(self.paths.qemu_log).strip()[-2000:]
        self.phase = Phase.ENDED
        if not self.owns_run():
            log(f"{self.guest.name}: ended ({ended['detail']}), but the run directory "
                "belongs to another start now: leaving it alone")
            return code
        try:
            ending.record_end(self.guest, self.state, ended, code)
        except OSError as err:
            log(f"{self.guest.name}: cannot record the end: {err.strerror}")
        log(f"{self.guest.name}: ended: {ended['detail']}")
        notify(f"STATUS=guest ended: {ended['detail']}")
        return code

    def run(self) -> int:
        try:
            if not (self.take_over() if self.adopt else self.start_qemu()):
                from kvmrun.guest import ending
                ending.record_end(self.guest, self.state, self.state.get("ended") or {
                    "reason": "failed-to-start", "detail": "QEMU failed to start"},
                    exits.EXIT_LAUNCH)
                return exits.EXIT_LAUNCH
            self.loop()
            return self.finish()
        finally:
            self.end_helpers()
            if self.ready_fd is not None:
                os.close(self.ready_fd)


USAGE = ("usage: python -m kvmrun.guest.supervisor NAME --run-dir DIR [--ready-fd FD] "
         "[--foreground] [--incoming] [--adopt QEMU_PID]")
COMMAND = ("import sys; sys.path.insert(0, {root!r}); "
           "from kvmrun.guest.supervisor import main; sys.exit(main())")


def command(name: str, base: Path, *extra: str) -> list[str]:
    """The supervisor's own interpreter: isolated (-I) and without `site` (-S), whose .pth
    files (an editable install's finder, setuptools' distutils hack) cost every guest's
    supervisor ~1.7 MiB PSS; it needs the standard library and kvmrun, found where this
    kvmrun is."""
    root = str(Path(__file__).resolve().parents[2])
    return [sys.executable, "-I", "-S", "-c", COMMAND.format(root=root), name,
            "--run-dir", str(base), *extra]


def main(argv: list[str] | None = None) -> int:
    """Started by kvmrun only; parses its few arguments by hand (argparse would cost memory
    in every guest's supervisor)."""
    args = list(sys.argv[1:] if argv is None else argv)
    name, run_dir, ready_fd, foreground, incoming, adopt = None, None, None, False, False, None
    try:
        while args:
            arg = args.pop(0)
            if arg == "--run-dir":
                run_dir = args.pop(0)
            elif arg == "--ready-fd":
                ready_fd = int(args.pop(0))
            elif arg == "--foreground":
                foreground = True
            elif arg == "--incoming":
                incoming = True
            elif arg == "--adopt":
                adopt = int(args.pop(0))
            elif name is None and not arg.startswith("-"):
                name = arg
            else:
                raise ValueError(arg)
    except (IndexError, ValueError):
        name = None
    if name is None or run_dir is None:
        sys.stderr.write(USAGE + "\n")
        return 2
    return Supervisor(Guest(name, Path(run_dir)), ready_fd, foreground, incoming,
                      adopt=adopt).run()


if __name__ == "__main__":
    sys.exit(main())
