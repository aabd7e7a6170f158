"""The one error hierarchy of kvmrun.

    KvmrunError                 exit 1   anything kvmrun reports to a user
     ├── ProfileError           exit 2   a profile is wrong (file, key path, line)
     ├── HostError              exit 3   the host lacks something (binary, /dev/kvm, firmware)
     ├── GuestError             exit 4   a guest is not in the state a command needs
     │    └── GuestTimeout      exit 5   a wait ran out (stop, wait, ready)
     ├── QMPError               exit 6   QEMU's monitor refused or failed a command
     └── LaunchError            exit 7   QEMU failed to start (carries argv and QEMU's stderr)

The CLI maps each class to its exit code; library code raises, never exits.
"""

from __future__ import annotations

import shlex


class KvmrunError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class Location:
    """Where a value came from: file, key path, line (1-based). Immutable.

    A plain class rather than a dataclass: every supervisor imports this module, and
    `dataclasses` brings inspect, ast and dis along (~1.4 MiB per guest)."""

    __slots__ = ("file", "path", "line")

    def __init__(self, file: str, path: tuple[str | int, ...] = (), line: int | None = None):
        object.__setattr__(self, "file", file)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "line", line)

    def __setattr__(self, name, value):
        raise AttributeError(f"Location is immutable (cannot set {name})")

    def _key(self) -> tuple:
        return (self.file, self.path, self.line)

    def __eq__(self, other) -> bool:
        return self._key() == other._key() if type(other) is Location else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Location(file={self.file!r}, path={self.path!r}, line={self.line!r})"

    @property
    def key(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        return f"{where}: {self.key}" if self.path else where


def format_path(path: tuple[str | int, ...]) -> str:
    """('disks', 1, 'interface') -> 'disks[1].interface'"""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class ProfileError(KvmrunError):
    exit_code = 2

    def __init__(self, location: Location, message: str, hint: str | None = None):
        super().__init__(f"{location}: {message}", hint)
        self.location = location
        self.reason = message


class HostError(KvmrunError):
    exit_code = 3


class GuestError(KvmrunError):
    exit_code = 4


class GuestTimeout(GuestError):
    exit_code = 5


class QMPError(KvmrunError):
    exit_code = 6


class LaunchError(KvmrunError):
    exit_code = 7

    def __init__(self, message: str, argv: list[str] | None = None, stderr: str = "",
                 hint: str | None = None):
        self.argv = argv or []
        self.stderr = stderr.strip()
        full = message
        if self.stderr:
            full += "\n  qemu said: " + self.stderr.replace("\n", "\n            ")
        if self.argv:
            full += "\n  command: " + shlex.join(self.argv)
        super().__init__(full, hint)
