"""What the CLI does to guests: start, stop, kill, status, list, pause/resume/reset, wait.

Each function works from the run directory and QMP alone, so every command keeps working
when a guest's supervisor has died.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kvmrun import runtime
from kvmrun.errors import GuestError, GuestTimeout, HostError, LaunchError, QMPError
from kvmrun.qmp import QMPClient, query
from kvmrun.runtime import Guest
from kvmrun.shutdown import Ladder, open_pidfd, wait_pidfd

if TYPE_CHECKING:          # status, list, stop… never load profiles (yaml): keep them quick
    from kvmrun.profile import Profile

Progress = Callable[[str], None]


# ---------------------------------------------------------------- start

def prepare(profile: Profile, note: Progress = lambda m: None) -> tuple[Profile, list[str]]:
    """Check the profile against the host and compile it (no side effects on guests)."""
    from kvmrun import checks, compile as compiler, host, storage
    from kvmrun.profile import warnings
    checks.check(profile)
    for warning in warnings(profile):
        note(f"kvmrun: warning: {warning}")
    profile = storage.with_formats(profile)
    binary = host.qemu_binary(profile.arch)
    facts = host.probe(verify_kvm=profile.accel == "auto", note=note)
    guest = Guest(profile.name)
    guest.paths.check_length()
    accel = compiler.resolve_accel(profile, facts)
    if profile.accel == "auto" and accel == "tcg" and not facts.forced_accel:
        from kvmrun import arch as archmod
        if archmod.get(profile.arch).kvm_possible(facts.machine):
            note("kvmrun: KVM is not usable here (see `kvmrun doctor`); using TCG")
    if accel == "kvm" and not host.kvm_accessible():
        raise HostError("accel kvm asked for, but /dev/kvm is not usable by this user",
                        hint="add yourself to the kvm group, or use accel: tcg")
    argv = compiler.compile(profile, facts, guest.paths)
    argv[0] = binary
    return profile, argv


def _disks_in_use(profile: Profile) -> dict[str, str]:
    """Disk paths of this profile that a running guest already has open: path -> guest.
    Disks only read (read-only ones, and the bases of ephemeral disks) may be shared by
    guests that only read them too."""
    mine = {os.path.realpath(d.path) for d in profile.disks
            if not d.readonly and not d.ephemeral}
    mine_read = {os.path.realpath(d.path) for d in profile.disks} - mine
    busy = {}
    for name in runtime.guest_names():
        if name == profile.name:
            continue
        other = Guest(name)
        if other.qemu_pid() is None:
            continue
        try:
            launch = other.read_launch()
            shared = {os.path.realpath(p) for p in launch.get("shared_disks", [])}
            for path in launch.get("disks", []):
                real = os.path.realpath(path)
                if real in mine or (real in mine_read and real not in shared):
                    busy[path] = name
        except (OSError, ValueError):
            continue
    return busy


def _claim(profile: Profile, guest: Guest, argv: list[str]) -> list[str]:
    """Under the guest's lock: refuse a second guest of this name or a disk in use, clear
    stale files, make the disks, overlays and seed the launch needs, and write launch.json.
    Returns the disks it created (a failed start removes them)."""
    if guest.qemu_pid() is not None:
        raise GuestError(f"{profile.name} is already running (pid {guest.qemu_pid()})",
                         hint=f"see `kvmrun status {profile.name}`")
    busy = _disks_in_use(profile)
    if busy:
        path, other = next(iter(busy.items()))
        raise GuestError(f"disk {path} is in use by running guest {other!r}",
                         hint="stop that guest first, or give this one its own disk")
    from kvmrun import network
    network.check(profile)
    guest.clear_runtime(keep_logs=False)
    from kvmrun import storage
    made = storage.prepare_guest(profile, guest.paths)
    try:
        network.setup(profile, guest.paths)
        _prepare_nvram(profile, guest)
        _write_launch(profile, guest, argv)
    except BaseException:
        storage.remove_created(made)
        raise
    return made


def start(profile: Profile, wait_ready: bool = True, note: Progress = lambda m: None) -> dict:
    """Start a guest under a detached supervisor; return once QMP answers (and the console
    matched the profile's ready pattern, with wait_ready). Nothing is left behind on failure."""
    profile, argv = prepare(profile, note)
    guest = Guest(profile.name)
    runtime.prepare_run_dir()
    created = not guest.paths.dir.exists()
    if profile.halted and wait_ready and profile.ready.console:
        note("kvmrun: halted: not waiting for the console (resume the guest first)")
        wait_ready = False
    with guest.lock() as lock_fd:
        made: list[str] = []
        try:
            made = _claim(profile, guest, argv)
            # the lock is released once QMP answers: a second start of the name then fails
            # at once with "already running" instead of waiting for this guest's boot
            return _spawn_and_wait(profile, guest, argv, wait_ready,
                                   unlock=lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN))
        except BaseException:
            _cleanup_failed(guest, created, made)
            raise


def run_foreground(profile: Profile, note: Progress = lambda m: None,
                   console: bool = False) -> int:
    """The supervisor in this process (systemd, scripts); returns its exit code."""
    from kvmrun.supervisor import Supervisor
    profile, argv = prepare(profile, note)
    guest = Guest(profile.name)
    runtime.prepare_run_dir()
    created = not guest.paths.dir.exists()
    with guest.lock():
        made: list[str] = []
        try:
            made = _claim(profile, guest, argv)
            sup = Supervisor(guest, None, foreground=True)
            if not sup.start_qemu():
                ended = (guest.read_state() or {}).get("ended") or {}
                raise LaunchError(f"QEMU failed to start: {ended.get('detail', '')}", argv,
                                  ended.get("stderr", ""),
                                  hint=_launch_hint(ended.get("stderr", "")))
        except BaseException:
            _cleanup_failed(guest, created, made)
            raise
    if console:
        import threading
        from kvmrun.console import relay

        def attach() -> None:
            try:
                relay(guest.paths.console)
            except GuestError as err:
                note(f"kvmrun: console: {err}")
                return
            if guest.qemu_pid() is not None:      # detached with Ctrl-]: stop the guest
                os.kill(os.getpid(), __import__("signal").SIGTERM)
        threading.Thread(target=attach, daemon=True).start()
    sup.loop()
    return sup.finish()


def _prepare_nvram(profile: Profile, guest: Guest) -> None:
    if profile.firmware != "uefi" or guest.paths.nvram is None or guest.paths.nvram.exists():
        return
    from kvmrun import host
    template = host.uefi_vars_template(profile.arch)
    if template is None:
        raise HostError(f"no UEFI variable-store template for {profile.arch}",
                        hint="install ovmf (x86_64) or qemu-efi-aarch64 (aarch64)")
    guest.paths.nvram.parent.mkdir(parents=True, exist_ok=True)
    tmp = guest.paths.nvram.with_suffix(".tmp")
    shutil.copyfile(template, tmp)
    os.replace(tmp, guest.paths.nvram)


def _write_launch(profile: Profile, guest: Guest, argv: list[str]) -> None:
    launch = {
        "argv": argv,
        "disks": [d.path for d in profile.disks],
        "shared_disks": [d.path for d in profile.disks if d.readonly or d.ephemeral],
        "ephemeral_disks": [i for i, d in enumerate(profile.disks) if d.ephemeral],
        "shares": [{"path": s.path, "tag": s.tag, "readonly": s.readonly}
                   for s in profile.shares],
        "ready_console": profile.ready.console,
        "ready_timeout": profile.ready.timeout,
        "shutdown_timeout": profile.shutdown.timeout,
        "shutdown_method": profile.shutdown.method,
        "shutdown_command": profile.shutdown.command,
        "summary": {
            "arch": profile.arch,
            "machine": argv[argv.index("-machine") + 1].split(",")[0],
            "accel": argv[argv.index("-accel") + 1].split(",")[0], "smp": profile.smp,
            "memory": profile.memory, "source": profile.source,
            "forwards": [f for n in profile.network for f in n.forward],
            "shutdown_method": profile.shutdown.method,
        },
    }
    runtime.atomic_write(guest.paths.dir / "launch.json", json.dumps(launch, indent=1))


def supervisor_command(name: str, base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvmrun.supervisor", name, "--run-dir", str(base), *extra]


def _spawn_and_wait(profile: Profile, guest: Guest, argv: list[str], wait_ready: bool,
                    unlock: Callable[[], None] = lambda: None) -> dict:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    errlog = open(guest.paths.dir / "supervisor.log", "ab")
    try:
        sup = subprocess.Popen(
            supervisor_command(profile.name, guest.paths.dir.parent, "--ready-fd", str(wfd)),
            pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errlog, start_new_session=True)
    finally:
        os.close(wfd)
        errlog.close()
    result = {"name": profile.name, "supervisor_pid": sup.pid}
    timeout = profile.ready.timeout + 35
    with os.fdopen(rfd, "rb") as pipe:
        deadline = time.monotonic() + timeout
        while True:
            if not select.select([pipe], [], [], max(0, deadline - time.monotonic()))[0]:
                raise GuestTimeout(f"{profile.name}: no word from the supervisor in "
                                   f"{timeout}s")
            line = pipe.readline()
            if not line:
                code = sup.wait()
                raise LaunchError(f"the supervisor of {profile.name} exited ({code}) "
                                  "before QEMU was up", argv,
                                  _read(guest.paths.dir / "supervisor.log"))
            message = json.loads(line)
            event = message["event"]
            if event == "failed":
                sup.wait()
                raise LaunchError(f"QEMU failed to start: {message['message']}", argv,
                                  message.get("stderr", ""),
                                  hint=_launch_hint(message.get("stderr", "")))
            if event == "qmp":
                result["pid"] = message["pid"]
                unlock()
                if not wait_ready or not profile.ready.console:
                    break
            if event == "ready":
                result["ready"] = True
                break
            if event == "ready-timeout":
                raise GuestTimeout(
                    f"{profile.name} is running but its console did not match "
                    f"{profile.ready.console!r} within {profile.ready.timeout}s",
                    hint=f"see `kvmrun logs {profile.name}`; the guest was left running")
    return result


def _launch_hint(stderr: str) -> str | None:
    if "Failed to get \"write\" lock" in stderr:
        return "another process uses this disk image"
    if "-cpu host" in stderr or "kvm" in stderr.lower():
        return ("on nested hosts KVM may not work; try accel: tcg, or a named CPU model "
                "instead of host (e.g. host,-arch-capabilities)")
    return None


def _cleanup_failed(guest: Guest, created: bool, made: list[str] = ()) -> None:
    """A failed start leaves no sockets, state, disks it created or (if it made it) run
    directory."""
    pid = guest.qemu_pid()
    if pid is not None:
        return                       # a guest is up (e.g. ready timeout): leave it running
    from kvmrun import network, storage
    network.teardown(guest.paths)
    storage.remove_created(made)
    if created:
        guest.remove_dir()
    else:
        guest.clear_runtime(keep_logs=False)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- stop / kill

def _identified_pidfd(guest: Guest) -> tuple[int, dict]:
    pid, state = runtime.require_running(guest)
    pidfd = open_pidfd(pid)
    if guest.qemu_pid(state) != pid:          # re-check after opening: no race with reuse
        os.close(pidfd)
        raise GuestError(f"{guest.name} is not running")
    return pidfd, state


def _cli_qmp(guest: Guest) -> Callable[[str], None]:
    def send(command: str) -> None:
        try:
            query(guest.paths.qmp_cli, command, timeout=3)
        except (QMPError, GuestError):
            pass
    return send


def _wait_supervisor(guest: Guest, state: dict, timeout: float = 10.0) -> None:
    """Give a live supervisor the moment it needs to record the end."""
    pid = guest.supervisor_pid(state)
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        wait_pidfd(fd, timeout)
    finally:
        os.close(fd)


def _record_end_without_supervisor(guest: Guest, state: dict, ended: dict) -> None:
    if guest.supervisor_pid(state) is not None:
        return
    final = guest.read_state() or state
    if final.get("ended"):
        return
    final.update(state=runtime.STOPPED if ended["reason"] != "crashed" else runtime.CRASHED,
                 ended={**ended, "at": time.time(), "note": "recorded by the CLI: the "
                        "guest's supervisor was not running"})
    guest.write_state(final)
    from kvmrun import network
    network.teardown(guest.paths)
    guest.clear_runtime()


def stop(guest: Guest, timeout: float | None = None, force: bool = False,
         progress: Callable[[str, str], None] = lambda s, m: None) -> dict:
    """Graceful shutdown with the profile's method; escalate only with force."""
    pidfd, state = _identified_pidfd(guest)
    try:
        launch = guest.read_launch()
        timeout = float(timeout if timeout is not None else launch.get("shutdown_timeout", 60))
        guest.set_request("stop", "kvmrun stop")
        recorded: list[str] = []

        def record_stage(stage: str, message: str) -> None:
            # The supervisor reads request.json the moment QEMU exits, so each stage is
            # written down before it is tried (writing it afterwards races the supervisor,
            # and would re-create the file after it cleaned up).
            if stage not in recorded:
                recorded.append(stage)
                runtime.atomic_write(guest.paths.dir / "request.json", json.dumps(
                    {"action": "stop", "by": "kvmrun stop", "at": time.time(),
                     "stage": stage}))
            progress(stage, message)

        ladder = Ladder(pidfd, _cli_qmp(guest), method=launch.get("shutdown_method", "acpi"),
                        console_sock=str(guest.paths.console), qga_sock=str(guest.paths.qga),
                        command=launch.get("shutdown_command", "poweroff"),
                        progress=record_stage)
        try:
            stage = ladder.run(timeout, force)
        except GuestTimeout:
            (guest.paths.dir / "request.json").unlink(missing_ok=True)
            raise
    finally:
        os.close(pidfd)
    _wait_supervisor(guest, state)
    _record_end_without_supervisor(guest, state, {"reason": "stopped", "by": "kvmrun stop",
                                                  "stage": stage,
                                                  "detail": f"stopped by kvmrun stop ({stage})"})
    return {"name": guest.name, "stage": stage, "state": guest.live_state()[0],
            "method": launch.get("shutdown_method", "acpi")}


def kill(guest: Guest) -> dict:
    """Hard power-off now: QMP quit, SIGKILL if QMP does not end it quickly."""
    pidfd, state = _identified_pidfd(guest)
    try:
        guest.set_request("kill", "kvmrun kill")
        stage = "quit"
        try:
            query(guest.paths.qmp_cli, "quit", timeout=2)
        except (QMPError, GuestError):
            pass
        if not wait_pidfd(pidfd, 3):
            import signal
            stage = "sigkill"
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_pidfd(pidfd, 30)
    finally:
        os.close(pidfd)
    _wait_supervisor(guest, state)
    _record_end_without_supervisor(guest, state, {"reason": "killed", "by": "kvmrun kill",
                                                  "detail": "powered off hard by kvmrun kill"})
    return {"name": guest.name, "stage": stage}


# ---------------------------------------------------------------- simple QMP verbs

def qmp_command(guest: Guest, command: str, arguments: dict | None = None,
                timeout: float = 10.0) -> object:
    runtime.require_running(guest)
    return query(guest.paths.qmp_cli, command, arguments, timeout=timeout)


def pause(guest: Guest) -> None:
    qmp_command(guest, "stop")


def resume(guest: Guest) -> None:
    qmp_command(guest, "cont")


def reset(guest: Guest) -> None:
    qmp_command(guest, "system_reset")


# ---------------------------------------------------------------- status / list

def status(guest: Guest, detailed: bool = True) -> dict:
    state_name, state = guest.live_state()
    if not state:
        raise GuestError(f"no guest named {guest.name!r} in {guest.paths.dir.parent}",
                         hint="see `kvmrun list --all`")
    summary = state.get("summary", {})
    pid = guest.qemu_pid(state)
    info = {
        "name": guest.name, "state": state_name, "pid": pid,
        "uptime": round(time.time() - state["started_at"], 1) if pid else None,
        "arch": summary.get("arch"), "machine": summary.get("machine"),
        "accel": summary.get("accel"), "vcpus": summary.get("smp"),
        "memory_mib": summary.get("memory"), "forwards": summary.get("forwards", []),
        "shutdown_method": summary.get("shutdown_method"), "ready": state.get("ready"),
        "profile": summary.get("source"),
        "console": str(guest.paths.console), "serial_log": str(guest.paths.serial_log),
        "qmp": str(guest.paths.qmp_cli), "run_dir": str(guest.paths.dir),
        "supervisor_pid": guest.supervisor_pid(state),
        "ended": None if pid else state.get("ended"),
    }
    try:
        launch = guest.read_launch()
    except (OSError, ValueError):
        launch = {}
    info["ephemeral_disks"] = launch.get("ephemeral_disks", [])
    from kvmrun import network
    info["nics"] = network.nic_status(guest.paths)
    info["shares"] = [{**s, "mount": share_mount_command(s["tag"], s["readonly"])}
                      for s in launch.get("shares", [])]
    if pid and detailed:
        info.update(_live_details(guest, pid))
    return info


def share_mount_command(tag: str, readonly: bool = False) -> str:
    """What a Linux guest runs to mount a virtio-9p share."""
    ro = ",ro" if readonly else ""
    return (f"mkdir -p /mnt/{tag} && mount -t 9p -o trans=virtio,version=9p2000.L{ro} "
            f"{tag} /mnt/{tag}")


def _device_id(block: dict) -> str:
    """The guest device's id from query-block: '/machine/peripheral/disk0/virtio-backend'
    -> 'disk0'; a drive without a device keeps its drive id."""
    qdev = block.get("qdev") or ""
    parts = qdev.split("/")
    if "peripheral" in parts and parts.index("peripheral") + 1 < len(parts):
        return parts[parts.index("peripheral") + 1]
    return qdev if qdev and "/" not in qdev else block["device"]


def _live_details(guest: Guest, pid: int) -> dict:
    details: dict = {}
    try:
        with QMPClient(guest.paths.qmp_cli, timeout=2) as client:
            status = client.execute("query-status")
            if status.get("status") == "paused" or not status.get("running"):
                details["state"] = runtime.PAUSED
            details["qemu_status"] = status.get("status")
            details["vcpus"] = len(client.execute("query-cpus-fast"))
            details["memory_mib"] = client.execute(
                "query-memory-size-summary")["base-memory"] // (1024 * 1024)
            details["disks"] = [
                {"device": _device_id(b),
                 "file": b.get("inserted", {}).get("file"),
                 "format": b.get("inserted", {}).get("drv"),
                 "readonly": b.get("inserted", {}).get("ro"),
                 "removable": b.get("removable")}
                for b in client.execute("query-block") if b.get("inserted")]
    except (QMPError, GuestError) as err:
        details["qmp_error"] = str(err)
    details.update(_proc_usage(pid))
    return details


def _proc_usage(pid: int) -> dict:
    """QEMU's CPU use averaged over its lifetime (as ps(1) shows it, so there is no
    sampling interval to sleep through) and its RSS, from /proc; {} if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        fields = stat[stat.rindex(")") + 2:].split()
        hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        cpu = (int(fields[11]) + int(fields[12])) / hz          # utime + stime
        elapsed = uptime - int(fields[19]) / hz                 # since its start time
        return {"cpu_percent": round(100 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
                "rss_mib": round(int(fields[21]) * page / 2**20, 1)}
    except (OSError, ValueError, IndexError):
        return {}


def list_guests(include_ended: bool = True) -> list[dict]:
    rows = []
    for name in runtime.guest_names():
        guest = Guest(name)
        state_name, state = guest.live_state()
        if not include_ended and state_name not in runtime.LIVE_STATES:
            continue
        summary = state.get("summary", {})
        pid = guest.qemu_pid(state)
        rows.append({"name": name, "state": state_name, "pid": pid,
                     "memory_mib": summary.get("memory"), "vcpus": summary.get("smp"),
                     "uptime": round(time.time() - state["started_at"], 1) if pid else None,
                     "ended": None if pid else (state.get("ended") or {}).get("reason"),
                     "unit": state.get("unit")})
    return rows


# ---------------------------------------------------------------- wait

def wait_for(guest: Guest, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    if what == "stopped":
        state_name, state = guest.live_state()
        pid = guest.qemu_pid(state)
        if pid is None:
            return
        fd = open_pidfd(pid)
        try:
            if not wait_pidfd(fd, timeout):
                raise GuestTimeout(f"{guest.name} still running after {timeout:g}s")
        finally:
            os.close(fd)
        _wait_supervisor(guest, state)
        return
    while time.monotonic() < deadline:
        state_name, state = guest.live_state()
        if what == "running" and state_name in (runtime.RUNNING, runtime.PAUSED):
            return
        if what == "ready" and state.get("ready") and guest.qemu_pid(state):
            return
        select.select([], [], [], 0.05)
    raise GuestTimeout(f"{guest.name} not {what} after {timeout:g}s")
