"""Files: the one atomic write, JSON records, and exclusive locks.

Every file kvmrun writes for others to read (state, launch record, definitions, pool and
network records, caches) goes through `atomic_write`: a temporary file in the same
directory, fsynced, renamed over the target; a failure removes the temporary file, so a
reader sees the old file or the new one and nothing is left behind. Light: the supervisor
and the hub import it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600, *,
                 make_dirs: int | None = None, sync_dir: bool = False) -> None:
    """Write `data` to `path` atomically (see the module docstring). `make_dirs` creates
    missing parent directories with that mode; `sync_dir` also fsyncs the directory."""
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


def write_json(path: Path, value: Any, mode: int = 0o600, **kw) -> None:
    atomic_write(path, json.dumps(value, indent=1), mode, **kw)


def read_json(path: Path, default: Any = None) -> Any:
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
