"""Starting guests: `start` (a detached supervisor) and `run` (the supervisor in this
process). Nothing is left behind when a start fails: each thing a start makes (disks,
overlays, the seed, taps, hub ports, the run directory) is undone by one ExitStack, in the
reverse order it was made, unless QEMU came up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Callable

from kvmrun import arch as archmod
from kvmrun import files, proc
from kvmrun.errors import GuestError, HostError, LaunchError
from kvmrun.guest import ending
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest, disks_in_use, lock_disks, prepare_run_dir
from kvmrun.net import checks as netchecks
from kvmrun.net import nics
from kvmrun.ops import quickstart
from kvmrun.ops import ssh as sshops
from kvmrun.profile import Profile, referenced_files, warnings
from kvmrun.qemu import checks, host
from kvmrun.qemu.compile import Compiled, build
from kvmrun.storage import disks, images

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


def _claim(profile: Profile, guest: Guest, compiled: Compiled,
           undo: contextlib.ExitStack) -> None:
    """Under the guest's lock: refuse a second guest of this name or a disk in use, clear
    stale files, make the disks, overlays, seed and NICs the launch needs, and write the
    launch record. Each thing made pushes its undo onto `undo`."""
    if guest.qemu_pid() is not None:
        raise GuestError(f"{profile.name} is already running (pid {guest.qemu_pid()})",
                         hint=f"see `kvmrun status {profile.name}`")
    lock_disks([d.path for d in profile.disks if not d.readonly and not d.ephemeral],
               undo.held)
    busy = disks_in_use(profile.name, [d.path for d in profile.disks],
                        [d.path for d in profile.disks if d.readonly or d.ephemeral])
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
    guest.reserve_request()


def _runas(argv: list[str]) -> str | None:
    return argv[argv.index("-runas") + 1] if "-runas" in argv else None


def launch_record(profile: Profile, compiled: Compiled) -> LaunchRecord:
    return LaunchRecord(
        argv=compiled.argv,
        disks=[d.path for d in profile.disks],
        shared_disks=[d.path for d in profile.disks if d.readonly or d.ephemeral],
        ephemeral_disks=[i for i, d in enumerate(profile.disks) if d.ephemeral],
        shares=[{"path": s.path, "tag": s.tag, "readonly": s.readonly}
                for s in profile.shares],
        ready_console=profile.ready.pattern, ready_timeout=profile.ready.timeout,
        shutdown_timeout=profile.shutdown.timeout, shutdown_method=profile.shutdown.method,
        shutdown_command=profile.shutdown.command,
        serial_log_max=profile.serial_log_max << 20, run_id=uuid.uuid4().hex,
        machine_type=host.machine_version(compiled.argv[0], compiled.machine.split(",")[0]),
        summary={"arch": profile.arch, "machine": compiled.machine, "accel": compiled.accel,
                 "smp": profile.smp, "memory": profile.memory, "source": profile.source,
                 "forwards": [f for n in profile.network for f in n.forward],
                 "shutdown_method": profile.shutdown.method,
                 "ssh": sshops.login_defaults(profile),
                 "sandbox": compiled.sandbox or "off",
                 "qemu_user": _runas(compiled.argv)})


class Undo(contextlib.ExitStack):
    """The undos of a start, and (`held`) what it holds until it returns."""

    held: contextlib.ExitStack


@contextlib.contextmanager
def _starting(guest: Guest):
    """The guest's lock and an ExitStack of undos; both released (and the undos run,
    the run directory cleared or removed) when the start fails before QEMU is up."""
    prepare_run_dir()
    created = not guest.paths.dir.exists()
    with guest.lock() as lock_fd, contextlib.ExitStack() as held:
        with Undo() as undo:
            undo.held = held                # what a start holds until it returns (locks)
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
    notes: list[str] = []

    def noted(line: str) -> None:
        note(line)
        if "debug:" not in line and "checking once" not in line:
            notes.append(line)
    resolved, compiled = prepare(profile, noted)
    guest = Guest(profile.name)
    if profile.halted and wait_ready and profile.ready.pattern:
        noted("kvmrun: halted: not waiting for the console (resume the guest first)")
        wait_ready = False
    with _starting(guest) as (lock_fd, undo):
        _claim(resolved, guest, compiled, undo)
        # the lock is released once QMP answers: a second start of the name then fails
        # at once with "already running" instead of waiting for this guest's boot
        result = _spawn_and_wait(resolved, guest, compiled.argv, wait_ready,
                                 unlock=lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN))
    entry = quick_entry(profile, resolved, launch_record(resolved, compiled), notes)
    if entry is not None:
        quickstart.save(profile.source, entry)
    return result


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
                              hint=quickstart.launch_hint(ended.get("stderr", "")))
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


SUPERVISOR = ("import sys; sys.path.insert(0, {root!r}); "
              "from kvmrun.guest.supervisor import main; sys.exit(main())")


def supervisor_command(name: str, base: Path, *extra: str) -> list[str]:
    """The supervisor's own interpreter: isolated (-I) and without `site` (-S), whose .pth
    files (an editable install's finder, setuptools' distutils hack) cost every guest's
    supervisor ~1.7 MiB PSS; it needs the standard library and kvmrun, found where this
    kvmrun is."""
    root = str(Path(__file__).resolve().parents[2])
    return [sys.executable, "-I", "-S", "-c", SUPERVISOR.format(root=root), name,
            "--run-dir", str(base), *extra]


def _spawn(profile: Profile, guest: Guest) -> tuple[subprocess.Popen, int]:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    errlog = files.open_private(guest.paths.supervisor_log, "ab")
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
    return quickstart.wait_for_supervisor(
        rfd, sup.wait, name=profile.name, argv=argv, ready_console=profile.ready.pattern,
        ready_timeout=profile.ready.timeout, wait_ready=wait_ready,
        log=guest.paths.supervisor_log, unlock=unlock, result={"supervisor_pid": sup.pid})


def quick_entry(profile: Profile, resolved: Profile, record: LaunchRecord,
                notes: list[str]) -> dict | None:
    """What kvmrun.ops.quickstart needs to start this profile again unchanged, if it can:
    a profile from files alone (no --set, one-off flags or --name), with nothing the quick
    path does not make (cloud-init seed, ephemeral overlays, networks beyond user)."""
    sources = sorted({file for file, _ in profile.lines.values()})
    if not profile.source or not all(os.path.isfile(f) for f in sources):
        return None
    if profile.cloud_init or any(d.ephemeral for d in profile.disks):
        return None
    if any(net.type not in ("user", "none") for net in profile.network):
        return None
    exist = [p for _, _, p in referenced_files(resolved)] + [d.path for d in resolved.disks]
    exist.append(record.argv[0])
    nvram = Guest(profile.name).paths.nvram
    if profile.firmware == "uefi" and nvram is not None:
        exist.append(str(nvram))
    formats = {new.path: new.format for old, new in zip(profile.disks, resolved.disks)
               if old.format is None and not images.is_block_device(new.path)}
    forwards = [(str(profile.location("network", i, "forward", j)), fwd)
                for i, net in enumerate(profile.network) for j, fwd in enumerate(net.forward)]
    return {"name": profile.name, "files": sources, "exist": exist, "formats": formats,
            "forwards": forwards, "nics": nics.describe(profile), "launch": record.to_json(),
            "notes": notes, "halted": profile.halted, "gdb": profile.gdb}
