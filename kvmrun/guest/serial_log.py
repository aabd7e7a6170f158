"""Rotation of a guest's serial.log (profile key `serial_log_max`), by its supervisor.

QEMU writes the log through its chardev `logfile=` with `logappend=on`: it holds the file
open with O_APPEND for its whole life and has no command to reopen it. So rotation is
copytruncate: the file is copied to serial.log.1, then truncated in place. A rename would
only rename the file QEMU keeps filling; after a truncation QEMU's next O_APPEND write lands
at offset 0, with no hole. Output written between the copy and the truncation (a few
microseconds) is lost. Standard library and ground floor only (the supervisor imports it).
"""

from __future__ import annotations

import os

from kvmrun import files
from kvmrun.paths import RunPaths


def rotate(paths: RunPaths, limit: int) -> bool:
    """Rotate serial.log if it is over `limit` bytes; True if it was cut. On a full run
    directory the log is truncated without a copy rather than left to fill the disk."""
    try:
        fd = os.open(paths.serial_log, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not limit or os.fstat(fd).st_size <= limit:
            return False
        tmp = paths.serial_log_old.with_name(".serial.log.1.tmp")
        try:
            with files.open_private(tmp, "wb") as old:
                while chunk := os.read(fd, 1 << 20):
                    old.write(chunk)
            os.replace(tmp, paths.serial_log_old)
        except OSError:
            files.unlink(tmp)
        os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
