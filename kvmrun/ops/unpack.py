"""`kvmrun import ARCHIVE|-`: a VM with its disks from an archive of kvmrun.ops.archive.

    is_archive(path)        a tar or zstd file (rather than a YAML profile)?
    import_archive(source)  verify, unpack, place and define; undone entirely on failure

See kvmrun.ops.archive for the format and the order of the checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

from kvmrun import paths, proc
from kvmrun.errors import AlreadyDefined, ProfileErrors, StorageError, UsageError
from kvmrun.qemu import checks
from kvmrun.ops.archive import CHUNK, FORMAT, MANIFEST, NVRAM, PROFILE, TPM_DIR, ZERO, \
    ZSTD_MAGIC, Progress
from kvmrun.proc import log_argv


def is_archive(path: str) -> bool:
    if path == "-":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head[:4] == ZSTD_MAGIC or head[257:262] == b"ustar"


class _Prefixed:
    """A read-only stream: `prefix`, then the rest of `raw`."""

    def __init__(self, prefix: bytes, raw: BinaryIO):
        self.prefix, self.raw = prefix, raw

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            head, self.prefix = (self.prefix, b"") if n < 0 or n >= len(self.prefix) else \
                (self.prefix[:n], self.prefix[n:])
            if n < 0:
                return head + self.raw.read()
            return head
        return self.raw.read(n)


class Source:
    """The archive's tar stream from a file or stdin, through `zstd -d` when compressed."""

    def __init__(self, source: str):
        self.raw = sys.stdin.buffer if source == "-" else open(source, "rb")
        self.zstd = self.feeder = None
        head = self.raw.read(4)
        if head == ZSTD_MAGIC:
            if proc.which("zstd") is None:
                raise StorageError("the archive is zstd-compressed and zstd is not installed",
                                   hint="apt-get install zstd")
            log_argv(["zstd", "-d", "-q", "-c"])
            self.zstd = subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.feeder = threading.Thread(target=self._feed, args=(head,), daemon=True)
            self.feeder.start()
            self.stream = self.zstd.stdout
        else:
            self.stream = _Prefixed(head, self.raw)

    def _feed(self, head: bytes) -> None:
        try:
            self.zstd.stdin.write(head)
            for chunk in iter(lambda: self.raw.read(CHUNK), b""):
                self.zstd.stdin.write(chunk)
            self.zstd.stdin.close()
        except (OSError, ValueError):
            pass

    def close(self, ok: bool) -> None:
        if self.zstd:
            if not ok and self.zstd.poll() is None:
                self.zstd.kill()
            self.zstd.wait()
            error = self.zstd.stderr.read().decode(errors="replace").strip()
            if ok and self.zstd.returncode != 0:
                raise StorageError(f"the archive does not decompress: {error}")
        if self.raw is not sys.stdin.buffer:
            self.raw.close()


# ---------------------------------------------------------------- checks

def _manifest(tar: tarfile.TarFile) -> dict:
    first = tar.next()
    if first is None or first.name != MANIFEST:
        raise StorageError("not a kvmrun archive: it does not start with manifest.json",
                           hint="make one with `kvmrun export NAME --with-disks`")
    try:
        manifest = json.load(tar.extractfile(first))
    except ValueError as err:
        raise StorageError(f"the archive's manifest is not JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise StorageError(f"archive format {manifest.get('format')!r} is not one this "
                           f"kvmrun reads ({FORMAT})")
    for entry in manifest.get("files", []):
        member = entry.get("member", "")
        folder, _, leaf = member.partition("/")
        if not (member == NVRAM or (folder in ("disks", TPM_DIR) and "/" not in leaf
                                    and leaf not in ("", ".", ".."))):
            raise StorageError(f"the archive names a file outside it: {member!r}")
    return manifest


def _target(member: str, name: str, dest: Path) -> Path:
    """Where an archive member goes: the variable store and TPM state to the VM's own
    places in the data directory, disks into `dest`."""
    if member == NVRAM:
        return paths.nvram_path(name)
    folder, _, leaf = member.partition("/")
    return paths.tpm_state_dir(name) / leaf if folder == TPM_DIR else dest / leaf


def _staged(stage: Path, member: str) -> Path:
    """A member's place in the staging directory (TPM files apart from the disks)."""
    folder, _, leaf = member.partition("/")
    return stage / TPM_DIR / leaf if folder == TPM_DIR else stage / Path(member).name


def _destination(manifest: dict, name: str, pool: str | None, directory: str | None) -> Path:
    if pool and directory:
        raise UsageError("give --pool or --dir, not both")
    if pool:
        from kvmrun.storage import pools
        data = pools.get(pool)
        if data.get("type") != "dir":
            raise UsageError(f"pool {pool!r} is not a directory pool; import needs one")
        return Path(data["path"])
    return Path(directory).absolute() if directory else paths.data_dir() / "disks" / name


def _refuse_existing(manifest: dict, name: str, dest: Path) -> None:
    if paths.is_defined(name):
        raise AlreadyDefined(f"a VM named {name!r} is already defined",
                             hint="--name NEW imports it under another name")
    for entry in manifest["files"]:
        target = _target(entry["member"], name, dest)
        if os.path.lexists(target):
            raise StorageError(f"{target} already exists; import never overwrites a disk",
                               hint="--dir DIR (or --pool) puts the disks elsewhere")
    need = sum(e.get("allocated", e["size"]) for e in manifest["files"])
    probe = dest
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    if st.f_bavail * st.f_frsize < need:
        raise StorageError(f"not enough space in {probe}: the disks need "
                           f"{need // (1 << 20)} MiB, {st.f_bavail * st.f_frsize >> 20} MiB "
                           "are free")


# ---------------------------------------------------------------- unpacking

def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo, target: Path, entry: dict,
             done: list[int], total: int, progress: Progress) -> None:
    """Write one member to `target` (zero blocks as holes) and check its size and sum."""
    sha = hashlib.sha256()
    source = tar.extractfile(info)
    with open(target, "xb") as f:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            sha.update(chunk)
            if chunk == ZERO[:len(chunk)]:
                f.seek(len(chunk), os.SEEK_CUR)
            else:
                f.write(chunk)
                done[0] += len(chunk)
                progress(min(done[0], total), total)
        f.truncate(f.tell())
        os.fsync(f.fileno())
    if info.size != entry["size"] or sha.hexdigest() != entry["sha256"]:
        raise StorageError(f"{entry['member']} in the archive is damaged (its size or "
                           "SHA-256 sum does not match the manifest); nothing imported")


def _unpack(tar, manifest: dict, stage: Path, progress: Progress,
            on_profile: Callable[[str], None] = lambda text: None) -> str:
    """Every member into `stage`, checked; returns the profile's text. `on_profile` sees it
    as soon as it is read (export writes it before the disks: a profile that cannot be
    defined here stops the import before a disk is written)."""
    entries = {e["member"]: e for e in manifest["files"]}
    seen, text = set(), None
    done, total = [0], sum(e.get("allocated", e["size"]) for e in entries.values())
    while (info := tar.next()) is not None:
        if info.name == PROFILE:
            text = tar.extractfile(info).read().decode()
            on_profile(text)
        elif info.name in entries and info.name not in seen and info.isfile():
            staged = _staged(stage, info.name)
            staged.parent.mkdir(exist_ok=True)
            _extract(tar, info, staged, entries[info.name], done, total, progress)
            seen.add(info.name)
        else:
            raise StorageError(f"the archive holds {info.name!r}, which its manifest does "
                               "not list; nothing imported")
    missing = sorted(set(entries) - seen)
    if text is None or missing:
        raise StorageError("the archive is incomplete (cut short?): "
                           + ", ".join(missing or [PROFILE]) + " missing; nothing imported")
    return text


def _rebase(manifest: dict, stage: Path) -> None:
    for entry in manifest["files"]:
        if entry.get("backing"):
            base = next(e for e in manifest["files"] if e["member"] == entry["backing"])
            argv = ["qemu-img", "rebase", "-u", "-F", base["format"], "-b",
                    Path(entry["backing"]).name, str(stage / Path(entry["member"]).name)]
            log_argv(argv)
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise StorageError(f"cannot rebase {entry['member']}: {done.stderr.strip()}")


def _profile(text: str, manifest: dict, name: str, dest: Path):
    import yaml
    from kvmrun.profile import from_mapping
    data = yaml.safe_load(text)
    data["name"] = name
    for disk in data.get("disks", []):
        for key in ("path", "backing"):
            if disk.get(key, "").startswith("disks/"):
                disk[key] = str(dest / disk[key][6:])
    where = f"{PROFILE} of the archive of {manifest['name']}"
    return from_mapping(data, {(): (where, None)}, where)


def import_archive(source: str, *, name: str | None = None, pool: str | None = None,
                   directory: str | None = None, check_files: bool = True,
                   progress: Progress = lambda d, t: None) -> dict:
    """Import the archive at `source` (a path, or "-" for stdin) as the defined VM `name`
    (default: the archived name), its disks in `directory` or `pool` (default
    $KVMRUN_DATA_DIR/disks/NAME). Nothing is left behind when it fails."""
    from kvmrun.ops import defined
    made: list[Path] = []
    stream = Source(source)
    ok = False
    stage = created = None
    try:
        try:
            tar = tarfile.open(fileobj=stream.stream, mode="r|")
            manifest = _manifest(tar)
        except (tarfile.TarError, EOFError) as err:
            raise StorageError(f"not a readable archive: {err}") from None
        name = paths.check_name(name or manifest["name"])
        dest = _destination(manifest, name, pool, directory)
        _refuse_existing(manifest, name, dest)
        if not dest.exists():
            created = dest
            while not created.parent.exists():
                created = created.parent
            dest.mkdir(parents=True, mode=0o755)
        stage = Path(tempfile.mkdtemp(prefix=".kvmrun-import-", dir=dest))
        carried = frozenset(str(dest / e["member"][6:]) for e in manifest["files"]
                            if e["member"] != NVRAM)

        def check(text: str) -> None:
            if check_files:
                errors = checks.missing_files(_profile(text, manifest, name, dest), carried)
                if errors:
                    raise ProfileErrors(errors)
        try:
            text = _unpack(tar, manifest, stage, progress, check)
        except (tarfile.TarError, EOFError) as err:
            raise StorageError(f"the archive is cut short or damaged ({err}); nothing "
                               "imported") from None
        ok = True
        stream.close(True)
        _rebase(manifest, stage)
        profile = _profile(text, manifest, name, dest)
        for entry in manifest["files"]:
            target = _target(entry["member"], name, dest)
            _place(_staged(stage, entry["member"]), target, made)
            if entry["member"].startswith(TPM_DIR + "/"):
                os.chmod(target, 0o600)               # the TPM's secrets: this user's only
        result = defined.define(profile, name, check_files=check_files)
        made, created = [], None                      # done: keep them
        return {"name": result.name, "path": str(result.path), "uuid": profile.vm_uuid,
                "disks": [d.path for d in profile.disks], "warnings": list(result.warnings)}
    except BaseException:
        if not ok:
            stream.close(False)
        for path in made:
            path.unlink(missing_ok=True)
        if name:
            try:
                paths.tpm_state_dir(name).rmdir()     # made for the TPM files, now empty
            except OSError:
                pass
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if created is not None:                       # failed: the directories it made
            shutil.rmtree(created, ignore_errors=True)


def _place(staged: Path, target: Path, made: list[Path]) -> None:
    """Move a checked file into place, never over an existing one."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.link(staged, target)
    except FileExistsError:
        raise StorageError(f"{target} appeared during the import; not overwritten") from None
    except OSError:                                   # another file system: copy
        with open(staged, "rb") as src, open(target, "xb") as dst:
            made.append(target)
            shutil.copyfileobj(src, dst)
        return
    made.append(target)
