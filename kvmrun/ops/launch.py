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
from pathlib import Path
from collections.abc import Callable

from kvmrun import arch as archmod
from kvmrun import files, paths, proc, records
from kvmrun.errors import GuestError, HostError, KvmrunError, LaunchError
from kvmrun.guest import cgroup, ending
from kvmrun.guest.launch import LaunchRecord
from kvmrun.guest.rundir import Guest, disks_in_use, lock_disks, prepare_run_dir
from kvmrun.net import checks as netchecks
from kvmrun.net import nics
from kvmrun.ops import quickstart
from kvmrun.ops import ssh as sshops
from kvmrun.profile import Profile, Ready, referenced_files, warnings
from kvmrun.qemu import checks, host, varstore
from kvmrun.qemu.compile import Compiled, build, stays_root
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
    nvram = guest.paths.nvram
    if profile.secure_boot and nvram and nvram.exists() and \
            not varstore.platform_key_enrolled(nvram):
        note(f"kvmrun: warning: {profile.name}'s UEFI variable store {nvram} has no Secure "
             "Boot keys (it was made for plain UEFI), so the firmware verifies nothing; "
             "remove it while the VM is stopped to start from Microsoft's keys")
    guest.paths.check_length([Path(h.socket) for h in compiled.helpers])
    if profile.accel == "auto" and compiled.accel == "tcg" and not facts.forced_accel:
        if archmod.get(profile.arch).kvm_possible(facts.machine):
            note("kvmrun: KVM is not usable here (see `kvmrun doctor`); using TCG")
    if compiled.accel == "kvm" and not host.kvm_accessible():
        raise HostError("accel kvm asked for, but /dev/kvm is not usable by this user",
                        hint="add yourself to the kvm group, or use accel: tcg")
    compiled.argv[0] = binary
    cgroup.check(profile.limits.asked())     # limits that cannot apply: refused, not skipped
    if compiled.qemu_user and compiled.qemu_user == host.DEFAULT_QEMU_USER:
        host.ensure_qemu_user(compiled.qemu_user, note)
    if proc.debug():
        for helper in compiled.helpers:
            note(f"kvmrun: debug: helper {helper.name}: {shlex.join(helper.argv)}")
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
    guest.begin_start()
    made = disks.prepare_guest(profile, guest.paths)
    undo.callback(disks.remove_created, made)
    undo.callback(nics.teardown, guest.paths)
    nics.setup(profile, guest.paths)
    _prepare_nvram(profile, guest)
    _prepare_tpm(profile, guest, undo)
    record = launch_record(profile, compiled)
    record.cgroup = _cgroup(profile, record.run_id, undo)
    record.write(guest.paths.launch)
    guest.reserve_request()


def _cgroup(profile: Profile, run_id: str, undo: contextlib.ExitStack) -> dict | None:
    """Where the profile's limits apply: a systemd scope QEMU starts in, or a cgroup
    directory made now (removed again if the start fails)."""
    limits = profile.limits.asked()
    how = cgroup.check(limits)
    if how == "scope":
        return {"scope": cgroup.scope_argv(profile.name, run_id, limits)}
    if how == "directory":
        leaf = cgroup.make_leaf(profile.name, limits)
        undo.callback(cgroup.remove, leaf, 1.0)
        return {"leaf": str(leaf)}
    return None


def _qemu_user(profile: Profile, compiled: Compiled) -> dict:
    """Who QEMU runs as, for status: the user it drops to, else the caller; and why a
    root kvmrun's QEMU keeps root."""
    if compiled.qemu_user:
        return {"qemu_user": compiled.qemu_user, "qemu_user_why": None}
    why = None
    if os.geteuid() == 0:
        why = stays_root(profile) or "KVMRUN_QEMU_USER=root"
    return {"qemu_user": host.user_name(os.geteuid()), "qemu_user_why": why}


def launch_record(profile: Profile, compiled: Compiled) -> LaunchRecord:
    return LaunchRecord(
        argv=compiled.argv,
        disks=[d.path for d in profile.disks],
        shared_disks=[d.path for d in profile.disks if d.readonly or d.ephemeral],
        ephemeral_disks=[i for i, d in enumerate(profile.disks) if d.ephemeral],
        shares=[{"path": s.path, "tag": s.tag, "readonly": s.readonly, "type": s.type}
                for s in profile.shares],
        helpers=[h.to_json() for h in compiled.helpers],
        ready_console=profile.ready.pattern, ready_timeout=profile.ready.timeout,
        shutdown_timeout=profile.shutdown.timeout, shutdown_method=profile.shutdown.method,
        shutdown_command=profile.shutdown.command,
        serial_log_max=profile.serial_log_max << 20, run_id=os.urandom(16).hex(),
        machine_type=host.machine_version(compiled.argv[0], compiled.machine.split(",")[0]),
        summary={"arch": profile.arch, "machine": compiled.machine, "accel": compiled.accel,
                 "smp": profile.smp, "memory": profile.memory, "source": profile.source,
                 "forwards": [f for n in profile.network for f in n.forward],
                 "shutdown_method": profile.shutdown.method,
                 "ssh": sshops.login_defaults(profile),
                 "sandbox": compiled.sandbox or "off", "limits": profile.limits.asked(),
                 "firmware": profile.firmware, "secure_boot": profile.secure_boot,
                 **_qemu_user(profile, compiled)})


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
    resolved, resumed = _resume(resolved, compiled, noted)
    if profile.halted and wait_ready and profile.ready.pattern:
        noted("kvmrun: halted: not waiting for the console (resume the guest first)")
        wait_ready = False
    with _starting(guest) as (lock_fd, undo):
        _claim(resolved, guest, compiled, undo)
        # the lock is released once QMP answers: a second start of the name then fails
        # at once with "already running" instead of waiting for this guest's boot
        result = _spawn_and_wait(resolved, guest, compiled.argv, wait_ready,
                                 unlock=lambda: fcntl.flock(lock_fd, fcntl.LOCK_UN),
                                 resumed=resumed)
    if resumed:
        result["resumed"] = resumed
        _thaw_resumed(guest, noted)
        return result
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
    profile, resumed = _resume(profile, compiled, note)
    with _starting(guest) as (_, undo):
        _claim(profile, guest, compiled, undo)
        sup = Supervisor(guest, None, foreground=True)
        if not sup.start_qemu():
            ended = (guest.read_state() or {}).get("ended") or {}
            helper = ended.get("helper_argv")       # a helper (virtiofsd, swtpm) failed
            if helper:
                raise LaunchError(f"{profile.name} failed to start: {ended.get('detail')}",
                                  helper, ended.get("stderr", ""),
                                  said_by=os.path.basename(helper[0]))
            raise LaunchError(f"QEMU failed to start: {ended.get('detail', '')}",
                              compiled.argv, ended.get("stderr", ""),
                              hint=_resume_hint(resumed) or
                              quickstart.launch_hint(ended.get("stderr", "")))
    if console:
        _attach_console(guest, note)
    if resumed:                              # the loaded RAM state may be frozen
        import threading
        threading.Thread(target=_thaw_resumed, args=(guest, note), daemon=True).start()
    try:
        sup.loop()
        return sup.finish()
    finally:
        sup.end_helpers()                 # also when the loop is interrupted


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
    template = host.uefi_vars_template(profile.arch, profile.secure_boot)
    if template is None:
        raise HostError(f"no UEFI variable-store template for {profile.arch}"
                        + (" with Microsoft's keys enrolled" if profile.secure_boot else ""),
                        hint="install ovmf (x86_64) or qemu-efi-aarch64 (aarch64)")
    files.atomic_write(guest.paths.nvram, Path(template).read_bytes(), 0o600, make_dirs=0o700)


TPM_STATE = "tpm2-00.permall"      # swtpm's permanent state file in its --tpmstate directory


def _prepare_tpm(profile: Profile, guest: Guest, undo: contextlib.ExitStack) -> None:
    """A TPM's first start manufactures it (swtpm_setup: the endorsement keys, the SHA-256
    PCR bank), as a new machine's TPM comes; later starts reuse the state. A failed first
    start removes what it made."""
    state = guest.paths.tpm
    if not profile.tpm or state is None or (state / TPM_STATE).exists():
        return
    made = not state.exists()
    files.mkdirs(state)
    if made:
        import shutil
        undo.callback(shutil.rmtree, state, True)
    proc.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--createek",
              "--not-overwrite"], what="swtpm_setup (making the guest's TPM)", timeout=120)


def _spawn_and_wait(profile: Profile, guest: Guest, argv: list[str], wait_ready: bool,
                    unlock: Callable[[], None] = lambda: None,
                    resumed: str | None = None) -> dict:
    pid, rfd = quickstart.fork_supervisor(guest)
    try:
        return quickstart.wait_for_supervisor(
            rfd, quickstart.reaper(pid), name=profile.name, argv=argv,
            ready_console=profile.ready.pattern, ready_timeout=profile.ready.timeout,
            wait_ready=wait_ready,
            log=guest.paths.supervisor_log, unlock=unlock, result={"supervisor_pid": pid})
    except LaunchError as err:
        if resumed:
            err.hint = _resume_hint(resumed)
        raise


def _resume(profile: Profile, compiled: Compiled, note: Progress) -> tuple[Profile, str | None]:
    """A pending RAM state (an offline `snapshot revert`, kvmrun.ops.snapshots): consumed,
    `-loadvm SNAP` added, and no console to wait for (the guest does not boot)."""
    if not paths.resume_path(profile.name).exists():   # most starts: not even the import
        return profile, None                            # of the snapshot machinery (~5 ms)
    from kvmrun.ops.snapshots import take_resume
    snap = take_resume(profile)
    if snap is None:
        return profile, None
    compiled.argv.extend(["-loadvm", snap])          # a frozen record, a list in it
    note(f"kvmrun: loading the RAM state of snapshot {snap} (once; the next start boots)")
    return records.replace(profile, ready=Ready(timeout=profile.ready.timeout)), snap


def _thaw_resumed(guest: Guest, note: Progress) -> None:
    """After -loadvm: thaw what the snapshot's RAM state had frozen (a note, never a failed
    start: the guest runs)."""
    try:
        from kvmrun.ops import agent       # a resume only (its socket: ~4 ms of a start)
        if agent.thaw_if_frozen(guest):
            note("kvmrun: the file systems were frozen in the snapshot's RAM state: thawed")
    except KvmrunError as err:
        note(f"kvmrun: warning: {err}")


def _resume_hint(snap: str | None) -> str | None:
    if snap is None:
        return None
    return (f"QEMU could not load the RAM state of snapshot {snap} (the profile changed "
            "since it was taken?); the disks are at the snapshot, and the next start boots "
            "from them")


def quick_entry(profile: Profile, resolved: Profile, record: LaunchRecord,
                notes: list[str]) -> dict | None:
    """What kvmrun.ops.quickstart needs to start this profile again unchanged, if it can:
    a profile from files alone (no --set, one-off flags or --name), with nothing the quick
    path does not make (cloud-init seed, ephemeral overlays, networks beyond user, the
    cgroup of limits)."""
    sources = sorted({file for file, _ in profile.lines.values()})
    if not profile.source or not all(os.path.isfile(f) for f in sources):
        return None
    if profile.cloud_init or any(d.ephemeral for d in profile.disks) or profile.limits.asked():
        return None
    if any(net.type not in ("user", "none") for net in profile.network):
        return None
    exist = [p for _, _, p in referenced_files(resolved)] + [d.path for d in resolved.disks]
    exist.append(record.argv[0])
    nvram = Guest(profile.name).paths.nvram
    if profile.firmware == "uefi" and nvram is not None:
        exist.append(str(nvram))
    exist += [helper["argv"][0] for helper in record.helpers]     # virtiofsd, swtpm
    tpm = Guest(profile.name).paths.tpm
    if profile.tpm and tpm is not None:          # a TPM made again takes the full path
        exist.append(str(tpm / TPM_STATE))
    formats = {new.path: new.format for old, new in zip(profile.disks, resolved.disks)
               if old.format is None and not images.is_block_device(new.path)}
    forwards = [(str(profile.location("network", i, "forward", j)), fwd)
                for i, net in enumerate(profile.network) for j, fwd in enumerate(net.forward)]
    return {"name": profile.name, "files": sources, "exist": exist, "formats": formats,
            "forwards": forwards, "nics": nics.describe(profile), "launch": record.to_json(),
            "notes": notes, "halted": profile.halted, "gdb": profile.gdb}
