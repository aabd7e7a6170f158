"""A VM with its disks in one archive: `kvmrun export NAME --with-disks`, `kvmrun import`.

The archive is a tar stream (GNU format, holes stored as holes), compressed with zstd when
the `zstd` command is installed. Its first member is `manifest.json`:

    {"format": 1, "name": …, "uuid": …, "profile": "profile.yaml",
     "files": [{"member": "disks/web.qcow2", "role": "disk"|"backing"|"nvram"|"tpm",
                "format": "qcow2", "backing": "disks/base.qcow2" | null,
                "size": bytes, "allocated": bytes, "sha256": hex}, …]}

then `profile.yaml` (self-contained: extends resolved, uuid pinned, .pub keys and
user_data_file inlined, disk paths relative to the archive), every disk image and each image
of its qcow2 backing chain once (or, with `flatten`, each disk converted to one image), the
UEFI variable store `nvram.fd`, and the TPM's state (`tpm: true`: swtpm's files,
`tpm/tpm2-00.permall`).

Import reads the manifest first (refusing an existing VM or file and a directory without the
room before writing anything), unpacks into a hidden staging directory beside the
destination, writing holes for zero blocks, and checks every size and SHA-256 sum; only then
does it rebase each overlay onto its base by a relative name, move the files into place (no
overwrite), install the variable store and define the VM. Any failure, Ctrl-C included,
removes everything it made.

A running guest is refused unless `live`: then the guest is paused (QEMU flushes its caches
on `stop`, so every disk is consistent at one instant), its disks and variable store are
copied beside themselves (`cp --reflink=auto --sparse=always`: instant on btrfs/XFS), and it
resumes before the copies are streamed. A pause was chosen over QMP `blockdev-backup`: it is
consistent across disks without a transaction, needs no scratch image per disk, and the
guest stops only for the local copy, never for the (slow) stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from kvmrun import files, paths, proc
from kvmrun.errors import GuestError, HostError, StorageError
from kvmrun.proc import log_argv
from kvmrun.records import asdict, field, record

FORMAT = 1
MANIFEST, PROFILE, NVRAM = "manifest.json", "profile.yaml", "nvram.fd"
TPM_DIR = "tpm"                    # members tpm/FILE: the TPM state directory's files
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
ZERO = bytes(CHUNK)

Progress = Callable[[int, int], None]          # (bytes done, bytes in all)


@record
class Item:
    member: str                       # its name in the archive
    source: str                       # where it is read from here
    role: str                         # disk, backing, nvram or tpm
    format: str | None = None
    backing: str | None = None        # the member it is based on
    size: int = 0
    allocated: int = 0
    sha256: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data


@record
class Plan:
    profile: dict
    items: list[Item] = field(default_factory=list)
    stage: Path | None = None

    def manifest(self) -> dict:
        return {"format": FORMAT, "name": self.profile["name"],
                "uuid": self.profile.get("uuid"), "profile": PROFILE,
                "files": [i.to_json() for i in self.items]}


# ---------------------------------------------------------------- files

def extents(fd: int, size: int):
    """The (offset, length) data extents of an open file (its holes skipped)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:                       # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def digest(path: str) -> tuple[str, int, int]:
    """(sha256 of the content, apparent size, bytes in data extents): holes hash as the
    zeros they read as, without being read."""
    sha = hashlib.sha256()
    allocated = pos = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, length in extents(fd, size):
            _zeros(sha, start - pos)
            allocated += length
            os.lseek(fd, start, os.SEEK_SET)
            left = length
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    break
                sha.update(chunk)
                left -= len(chunk)
            pos = start + length
        _zeros(sha, size - pos)
    finally:
        os.close(fd)
    return sha.hexdigest(), size, allocated


def _zeros(sha, n: int) -> None:
    while n > 0:
        sha.update(ZERO[:min(n, CHUNK)])
        n -= CHUNK


def _run(argv: list[str], what: str) -> None:
    log_argv(argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise HostError(f"{argv[0]} not found") from None
    if done.returncode != 0:
        raise StorageError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")


# ---------------------------------------------------------------- export

def _chain(path: str, fmt: str | None) -> list[tuple[str, str]]:
    """[(image, format)] of a disk and its backing chain, the disk first."""
    from kvmrun.storage import images
    if fmt == "raw" or images.is_block_device(path):
        return [(path, fmt or "raw")]
    return [(p, images.detect_format(p)) for p in images.backing_chain(path)]


def plan(profile, stage: Path, flatten: bool = False) -> Plan:
    """What the archive of `profile` holds; `stage` gets flattened copies and the symlink
    tree tar reads."""
    from kvmrun.ops.defined import portable_dict
    data = portable_dict(profile)
    result = Plan(data, stage=stage)
    members: dict[str, str] = {}          # realpath -> member
    used: set[str] = set()

    def member(path: str) -> str:
        base = Path(path).name
        name, n = f"disks/{base}", 1
        while name in used:
            n += 1
            name = f"disks/{n}-{base}"
        used.add(name)
        return name

    for index, disk in enumerate(profile.disks):
        chain = _chain(disk.path, disk.format)
        if flatten and len(chain) > 1:
            flat = stage / "flat" / f"{index}-{Path(disk.path).name}"
            flat.parent.mkdir(exist_ok=True)
            _run(["qemu-img", "convert", "-O", "qcow2", disk.path, str(flat)],
                 f"flattening {disk.path}")
            chain = [(str(flat), "qcow2")]
        names = []
        for depth, (image, fmt) in enumerate(chain):
            real = os.path.realpath(image)
            if real not in members:
                members[real] = member(disk.path if depth == 0 else image)
                result.items.append(Item(members[real], image, "disk" if depth == 0
                                         else "backing", fmt))
            names.append(members[real])
        by_member = {i.member: i for i in result.items}
        for upper, lower in zip(names, names[1:]):
            by_member[upper].backing = lower
        entry = data["disks"][index]
        entry.pop("pool", None)
        entry.pop("volume", None)
        entry["path"] = names[0]
        entry["format"] = chain[0][1]
        if entry.get("backing"):
            entry["backing"] = names[1] if len(names) > 1 else None
            if entry["backing"] is None:
                entry.pop("backing")
    nvram = paths.nvram_path(profile.name)
    if profile.firmware == "uefi" and nvram.exists():
        result.items.append(Item(NVRAM, str(nvram), "nvram", "raw"))
    tpm = paths.tpm_state_dir(profile.name)
    if profile.tpm and tpm.is_dir():          # swtpm's state (not its .lock)
        for file in sorted(tpm.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                result.items.append(Item(f"{TPM_DIR}/{file.name}", str(file), "tpm", "raw"))
    return result


def _freeze_copies(profile, guest, result: Plan) -> None:
    """--live: pause, copy every file beside itself, resume; the copies go in the archive.
    While it holds the guest's monitor (one client at a time), monitor.json says so:
    `kvmrun status` reports the holder instead of asking the monitor and calling a paused
    guest "not responding"."""
    from kvmrun.guest.qmp import QMPClient
    me = os.getpid()
    files.write_json(guest.paths.monitor_hold, {"by": "kvmrun export --live", "pid": me,
                                                "starttime": proc.starttime(me)}, durable=False)
    try:
        with QMPClient(guest.paths.qmp_cli, timeout=30) as qmp:
            was_running = qmp.execute("query-status").get("running")
            qmp.execute("stop")
            try:
                for item in result.items:
                    copy = result.stage / "live" / item.member
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    _run(["cp", "--reflink=auto", "--sparse=always", item.source, str(copy)],
                         f"copying {item.source}")
                    item.source = str(copy)
            finally:
                if was_running:
                    qmp.execute("cont")
    finally:
        files.unlink(guest.paths.monitor_hold)


def export(profile, out: BinaryIO, *, flatten: bool = False, live: bool = False,
           compress: bool | None = None, progress: Progress = lambda d, t: None) -> dict:
    """Write the archive of `profile` (a defined VM or a profile file) to `out`."""
    from kvmrun.guest.rundir import Guest
    from kvmrun.ops.defined import is_running, yaml_text
    running = is_running(profile.name)
    if running and not live:
        raise GuestError(f"{profile.name} is running; its disks would be copied while they "
                         "change", hint="stop it first, or --live (pauses it while its disks "
                                        "are copied beside themselves)")
    stage = Path(tempfile.mkdtemp(prefix="kvmrun-export-"))
    try:
        result = plan(profile, stage, flatten)
        if running:
            _freeze_copies(profile, Guest(profile.name), result)
        for item in result.items:
            item.sha256, item.size, item.allocated = digest(item.source)
        tree = stage / "tree"
        (tree / "disks").mkdir(parents=True)
        (tree / MANIFEST).write_text(json.dumps(result.manifest(), indent=1) + "\n")
        (tree / PROFILE).write_text(yaml_text(result.profile))
        for item in result.items:
            (tree / item.member).parent.mkdir(exist_ok=True)
            os.symlink(os.path.abspath(item.source), tree / item.member)
        total = sum(i.allocated for i in result.items) + 512 * (4 + 3 * len(result.items))
        members = [MANIFEST, PROFILE] + [i.member for i in result.items]
        _stream_tar(tree, members, out, compress, total, progress)
        return {"name": profile.name, "files": [i.to_json() for i in result.items],
                "bytes": total, "live": running}
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def zstd_available() -> bool:
    return proc.which("zstd") is not None


def _stream_tar(tree: Path, members: list[str], out: BinaryIO, compress: bool | None,
                total: int, progress: Progress) -> None:
    argv = ["tar", "--sparse", "--format=gnu", "--dereference", "--owner=0", "--group=0",
            "--numeric-owner", "-c", "-f", "-", "-C", str(tree), "--", *members]
    log_argv(argv)
    tar = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    zstd = None
    if compress is None:
        compress = zstd_available()
    if compress:
        log_argv(["zstd", "-q", "-c", "-T0"])
        zstd = subprocess.Popen(["zstd", "-q", "-c", "-T0"], stdin=tar.stdout, stdout=out,
                                stderr=subprocess.PIPE)
        tar.stdout.close()
    try:
        if zstd is None:
            done = 0
            for chunk in iter(lambda: tar.stdout.read(CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                progress(done, total)
        else:
            _watch(tar, total, progress)
            zstd.wait()
        tar.wait()
    except BaseException:
        for p in (tar, zstd):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        raise
    if tar.returncode != 0:
        raise StorageError(f"tar failed: {tar.stderr.read().decode(errors='replace').strip()}")
    if zstd is not None and zstd.returncode != 0:
        raise StorageError("zstd failed: "
                           + zstd.stderr.read().decode(errors="replace").strip())
    out.flush()


def _watch(tar: subprocess.Popen, total: int, progress: Progress) -> None:
    """Progress while tar feeds zstd: what tar has read of its input (/proc/PID/io)."""
    while tar.poll() is None:
        try:
            text = Path(f"/proc/{tar.pid}/io").read_text()
            done = int(next(l.split()[1] for l in text.splitlines()
                            if l.startswith("rchar")))
            progress(min(done, total), total)
        except (OSError, StopIteration, ValueError):
            pass
        try:
            tar.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
    progress(total, total)


def export_to(host, profile, *, name: str | None = None, directory: str | None = None,
              flatten: bool = False, live: bool = False,
              progress: Progress = lambda d, t: None) -> dict:
    """Stream the archive straight into `kvmrun import -` on `host` (kvmrun.ops.remote)."""
    from kvmrun.ops import remote
    words = ["import", "-", "--json"] + (["--name", name] if name else []) \
        + (["--dir", directory] if directory else [])
    argv = remote.ssh_argv(host, remote.kvmrun_words(words))
    log_argv(argv)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    relay = remote.Relay(proc.stderr, relay=False)
    relay.start()
    reply: list[bytes] = []
    reader = threading.Thread(target=lambda: reply.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        try:
            summary = export(profile, proc.stdin, flatten=flatten, live=live,
                             progress=progress)
        except BrokenPipeError:
            summary = None                   # the far side gave up: its reason follows
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    reader.join(10)
    relay.join(5)
    failure = remote.failure_of(host, code, relay, "kvmrun")
    if failure:
        raise failure
    if code != 0 or summary is None:
        said = "".join(relay.lines).strip().removeprefix("kvmrun: error: ")
        raise StorageError(f"import on {host} failed: {said or f'exit status {code}'}")
    try:
        summary["imported"] = json.loads(b"".join(reply) or b"{}")
    except ValueError:
        summary["imported"] = {}
    return summary
