"""Files: the one atomic write, JSON records, and exclusive locks.

Every file kvmrun writes for others to read (state, launch record, definitions, pool and
network records, caches) goes through `atomic_write`: a temporary file in the same
directory, fsynced, renamed over the target; a failure removes the temporary file, so a
reader sees the old file or the new one and nothing is left behind. A guest's run-time
records (state, launch, network and request records) skip the fsync (`durable=False`):
they mean nothing after a reboot (kvmrun.guest.rundir checks the boot id), so a power loss
has nothing of theirs to keep, and the rename is atomic all the same; on a run directory
that is not a tmpfs each fsync was 0.4–3 ms of every start. Light: the supervisor and the
hub import it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator  # not typing: ~1 MiB in every supervisor

from kvmrun.errors import NotPrivate

try:            # CPython's own SHA-256: hashlib's loads OpenSSL (libcrypto), ~5-50 ms of a
    from _sha256 import sha256     # quick start on a loaded host; same digests
except ImportError:                # Python 3.12 renamed it: hashlib's, slower to import
    from hashlib import sha256


def mkdirs(directory: Path, mode: int = 0o700) -> None:
    """Create `directory` and missing parents with `mode`, whatever the umask."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)


def private_dir(directory: Path, create: bool = True) -> Path:
    """`directory` as kvmrun may trust it: a real directory (not a link), owned by this
    user, entered by nobody else (as ssh insists for ~/.ssh). Created 0700 when missing;
    a directory of ours that others may enter is tightened to 0700; one owned by another
    user (say a /tmp/kvmrun-UID planted by someone else) raises NotPrivate."""
    if create:
        mkdirs(directory, 0o700)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return directory
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotPrivate(f"{directory} is not a directory (a link or a file is there)")
    if st.st_uid != os.geteuid():
        raise NotPrivate(f"{directory} belongs to uid {st.st_uid}, not to this user "
                         f"(uid {os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, *,
                 make_dirs: int | None = None, sync_dir: bool = False,
                 durable: bool = True) -> None:
    """Write `data` to `path` atomically (see the module docstring). `make_dirs` creates
    missing parent directories with that mode; `sync_dir` also fsyncs the directory;
    `durable=False` skips the file's fsync (a record that a reboot makes void)."""
    path = Path(path)
    if make_dirs is not None:
        mkdirs(path.parent, make_dirs)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data.encode() if isinstance(data, str) else data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise
    if sync_dir:
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass            # the rename happened; a directory fsync is best effort


RESERVED = 4096       # bytes a reserved record keeps allocated (one page)


def reserve(path: Path, size: int = RESERVED, durable: bool = True) -> None:
    """Create `path` as `size` bytes of blanks, so later `write_reserved` calls need no
    free space (a stop or kill on a full run directory must still be recorded). The space
    is the file's once `write` returns (ext4's delayed allocation reserves it then; tmpfs
    allocates it), so `durable=False` (a record a reboot makes void) skips the fsync."""
    atomic_write(path, b" " * size, durable=durable)


def write_reserved(path: Path, data: str) -> None:
    """Write `data` over a file made by `reserve`, in place and padded with blanks (JSON
    allows trailing blanks), under an flock readers take too. Falls back to `atomic_write`
    when the file is missing or too small."""
    raw = data.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return atomic_write(path, raw)
    try:
        size = os.fstat(fd).st_size
        if size < len(raw):
            return atomic_write(path, raw)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, raw + b" " * (size - len(raw)), 0)
    finally:
        os.close(fd)


def read_reserved(path: Path) -> object:
    """The JSON of a reserved record (None when missing, blank or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        raw = os.read(fd, 1 << 20)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def overwrite(path: Path, data: str) -> None:
    """Replace the contents of an existing file in place (no temporary file, so it needs
    no free space while the new text fits the old file's blocks): the fallback of a
    record that must be written on a full disk."""
    raw = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, raw + b" " * max(0, size - len(raw)), 0)    # JSON allows the blanks
    finally:
        os.close(fd)


def open_private(path: Path, mode: str = "ab"):
    """A log file opened for writing with O_NOFOLLOW (a planted link is refused, never
    followed), created 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (
        os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


def write_json(path: Path, value: object, mode: int = 0o600, **kw) -> None:
    atomic_write(path, json.dumps(value, indent=1), mode, **kw)


def read_json(path: Path, default: object = None) -> object:
    """The JSON in `path`, or `default` when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def read_text(path: Path, default: str = "") -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return default


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_locked(fd: int) -> bool:
    """Whether another open file description holds a write lock on the file of `fd`
    (F_OFD_GETLK: asks without taking the lock, so it never races the holder)."""
    query = struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        found = fcntl.fcntl(fd, getattr(fcntl, "F_OFD_GETLK", 36), query)
    except OSError:
        return False
    return struct.unpack("hhqqixxxx", found)[0] != fcntl.F_UNLCK


@contextmanager
def flocked(path: Path, timeout: float = 30.0) -> Iterator[int]:
    """An exclusive flock on `path` (created 0600 with its directory 0700), held for the
    block; waits up to `timeout` seconds, then raises TimeoutError."""
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(path) from None
                time.sleep(0.05)
        yield fd
    finally:
        os.close(fd)
