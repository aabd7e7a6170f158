"""Starting guests: `start` (a detached supervisor) and `run` (the supervisor in this
process). Nothing is left behind when a start fails: each thing a start makes (disks,
overlays, the seed, taps, hub ports, the run directory) is undone by one ExitStack, in the
reverse order it was made, unless QEMU came up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from kvmrun import arch as archmod
from kvmrun import files, proc
from kvmrun.errors import GuestError, GuestTimeout, HostError, LaunchError
from kvmrun.guest import ending
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest, live_launches, prepare_run_dir
from kvmrun.net import checks as netchecks
from kvmrun.net import nics
from kvmrun.profile import Profile, warnings
from kvmrun.qemu import checks, host
from kvmrun.qemu.compile import Compiled, build
from kvmrun.storage import disks

Progress = Callable[[str], None]


def prepare(profile: Profile, note: Progress = lambda m: None) -> tuple[Profile, Compiled]:
    """Check the profile against the host and compile it (no side effects on guests)."""
    checks.check(profile)
    for warning in warnings(profile):
        note(f"kvmrun: warning: {warning}")
    profile = disks.with_formats(profile)
    binary = host.qemu_binary(profile.arch)
    facts = host.probe(verify_kvm=profile.accel == "auto", note=note)
    guest = Guest(profile.name)
    guest.paths.check_length()
    compiled = build(profile, facts, guest.paths)
    if profile.accel == "auto" and compiled.accel == "tcg" and not facts.forced_accel:
        if archmod.get(profile.arch).kvm_possible(facts.machine):
            note("kvmrun: KVM is not usable here (see `kvmrun doctor`); using TCG")
    if compiled.accel == "kvm" and not host.kvm_accessible():
        raise HostError("accel kvm asked for, but /dev/kvm is not usable by this user",
                        hint="add yourself to the kvm group, or use accel: tcg")
    compiled.argv[0] = binary
    if proc.debug():
        note(f"kvmrun: debug: qemu: {shlex.join(compiled.argv)}")
    return profile, compiled


def _disks_in_use(profile: Profile) -> dict[str, str]:
    """Disk paths of this profile that a running guest already has open: path -> guest.
    Disks only read (read-only ones, and the bases of ephemeral disks) may be shared by
    guests that only read them too."""
    mine = {os.path.realpath(d.path) for d in profile.disks
            if not d.readonly and not d.ephemeral}
    mine_read = {os.path.realpath(d.path) for d in profile.disks} - mine
    busy = {}
    for name, launch in live_launches(skip=profile.name):
        shared = {os.path.realpath(p) for p in launch.shared_disks}
        for path in launch.disks:
            real = os.path.realpath(path)
            if real in mine or (real in mine_read and real not in shared):
                busy[path] = name
    return busy


def _claim(profile: Profile, guest: Guest, compiled: Compiled,
           undo: contextlib.ExitStack) -> None:
    """Under the guest's lock: refuse a second guest of this name or a disk in use, clear
    stale files, make the disks, overlays, seed and NICs the launch needs, and write the
    launch record. Each thing made pushes its undo onto `undo`."""
    if guest.qemu_pid() is not None:
        raise GuestError(f"{profile.name} is already running (pid {guest.qemu_pid()})",
                         hint=f"see `kvmrun status {profile.name}`")
    busy = _disks_in_use(profile)
    if busy:
        path, other = next(iter(busy.items()))
        raise GuestError(f"disk {path} is in use by running guest {other!r}",
                         hint="stop that guest first, or give this one its own disk")
    netchecks.check(profile)
    guest.clear_runtime(keep_logs=False)
    made = disks.prepare_guest(profile, guest.paths)
    undo.callback(disks.remove_created, made)
    undo.callback(nics.teardown, guest.paths)
    nics.setup(profile, guest.paths)
    _prepare_nvram(profile, guest)
    launch_record(profile, compiled).write(guest.paths.launch)


def launch_record(profile: Profile, compiled: Compiled) -> LaunchRecord:
    return LaunchRecord(
        argv=compiled.argv,
        disks=[d.path for d in profile.disks],
        shared_disks=[d.path for d in profile.disks if d.readonly or d.ephemeral],
        ephemeral_disks=[i for i, d in enumerate(profile.disks) if d.ephemeral],
        shares=[{"path": s.path, "tag": s.tag, "readonly": s.readonly}
                for s in profile.shares],
        ready_console=profile.ready.console, ready_timeout=profile.ready.timeout,
        shutdown_timeout=profile.shutdown.timeout, shutdown_method=profile.shutdown.method,
        shutdown_command=profile.shutdown.command,
        machine_type=host.machine_version(compiled.argv[0], compiled.machine.split(",")[0]),
        summary={"arch": profile.arch, "machine": compiled.machine, "accel": compiled.accel,
                 "smp": profile.smp, "memory": profile.memory, "source": profile.source,
                 "forwards": [f for n in profile.network for f in n.forward],
                 "shutdown_method": profile.shutdown.method})


@contextlib.contextmanager
def _starting(guest: Guest):
    """The guest's lock and an ExitStack of undos; both released (and the undos run,
    the run directory cleared or removed) when the start fails before QEMU is up."""
    prepare_run_dir()
    created = not guest.paths.dir.exists()
    with guest.lock() as lock_fd:
        with contextlib.ExitStack() as undo:
            undo.callback(_forget, guest, created)
            try:
                yield lock_fd, undo
            except BaseException:
                if guest.qemu_pid() is not None:   # up (e.g. ready timeout): leave it be
                    undo.pop_all()
                raise
            undo.pop_all()                          # success: keep everything


def _forget(guest: Guest, created: bool) -> None:
    """The last undo of a failed start: no sockets, state, or (if it made it) run dir."""
    ending.release(guest)
    if created:
        guest.remove_dir()
    else:
        guest.clear_runtime(keep_logs=False)


def start(profile: Profile, wait_ready: bool = True, note: Progress = lambda m: None) -> dict:
    """Start a guest under a detached supervisor; return once QMP answers (and the console
    matched the profile's ready pattern, with wait_ready). Nothing is left behind on failure."""
    profile, compiled = prepare(profile, note)
    guest = Guest(profile.name)
    if profile.halted and wait_ready and profile.ready.console:
        note("kvmrun: halted: not waiting for the console (resume the guest first)")
        wait_ready = False
    with _starting(guest) as (lock_fd, undo):
        _claim(profile, guest, compiled, undo)
        # the lock is released once QMP answers: a second start of the name then fails
        # at once with "already running" instead of waiting for this guest's boot
        return _spawn_and_wait(profile, guest, compiled.argv, wait_ready,
                               unlock=lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN))


def run_foreground(profile: Profile, note: Progress = lambda m: None,
                   console: bool = False) -> int:
    """The supervisor in this process (systemd, scripts); returns its exit code."""
    from kvmrun.guest.supervisor import Supervisor
    profile, compiled = prepare(profile, note)
    guest = Guest(profile.name)
    with _starting(guest) as (_, undo):
        _claim(profile, guest, compiled, undo)
        sup = Supervisor(guest, None, foreground=True)
        if not sup.start_qemu():
            ended = (guest.read_state() or {}).get("ended") or {}
            raise LaunchError(f"QEMU failed to start: {ended.get('detail', '')}",
                              compiled.argv, ended.get("stderr", ""),
                              hint=launch_hint(ended.get("stderr", "")))
    if console:
        _attach_console(guest, note)
    sup.loop()
    return sup.finish()


def _attach_console(guest: Guest, note: Progress) -> None:
    """The serial console on this terminal; detaching (Ctrl-]) stops the guest."""
    import signal
    import threading

    from kvmrun.guest.console import relay

    def attach() -> None:
        try:
            relay(guest.paths.console)
        except GuestError as err:
            note(f"kvmrun: console: {err}")
            return
        if guest.qemu_pid() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=attach, daemon=True).start()


def _prepare_nvram(profile: Profile, guest: Guest) -> None:
    if profile.firmware != "uefi" or guest.paths.nvram is None or guest.paths.nvram.exists():
        return
    template = host.uefi_vars_template(profile.arch)
    if template is None:
        raise HostError(f"no UEFI variable-store template for {profile.arch}",
                        hint="install ovmf (x86_64) or qemu-efi-aarch64 (aarch64)")
    files.atomic_write(guest.paths.nvram, Path(template).read_bytes(), 0o600, make_dirs=0o700)


def supervisor_command(name: str, base: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvmrun.guest.supervisor", name, "--run-dir", str(base),
            *extra]


def _spawn(profile: Profile, guest: Guest) -> tuple[subprocess.Popen, int]:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    errlog = open(guest.paths.supervisor_log, "ab")
    try:
        sup = subprocess.Popen(
            supervisor_command(profile.name, guest.paths.dir.parent, "--ready-fd", str(wfd)),
            pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=errlog, start_new_session=True)
    finally:
        os.close(wfd)
        errlog.close()
    return sup, rfd


def _spawn_and_wait(profile: Profile, guest: Guest, argv: list[str], wait_ready: bool,
                    unlock: Callable[[], None] = lambda: None) -> dict:
    sup, rfd = _spawn(profile, guest)
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
                                  files.read_text(guest.paths.supervisor_log))
            message = json.loads(line)
            event = message["event"]
            if event == "failed":
                sup.wait()
                raise LaunchError(f"QEMU failed to start: {message['message']}", argv,
                                  message.get("stderr", ""),
                                  hint=launch_hint(message.get("stderr", "")))
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


def launch_hint(stderr: str) -> str | None:
    if "Failed to get \"write\" lock" in stderr:
        return "another process uses this disk image"
    if "-cpu host" in stderr or "kvm" in stderr.lower():
        return ("on nested hosts KVM may not work; try accel: tcg, or a named CPU model "
                "instead of host (e.g. host,-arch-capabilities)")
    return None

