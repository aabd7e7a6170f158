"""Every error class of kvmrun, and the exit code the CLI gives each.

    KvmrunError                 exit 1   anything kvmrun reports to a user
     ├── UsageError             exit 2   a command was called wrongly (a bad --for, bad JSON)
     ├── ProfileError           exit 2   a profile is wrong (file, key path, line)
     │    ├── ProfileErrors     exit 2   several at once, one per line
     │    └── LostSettings      exit 2   a libvirt domain uses what kvmrun cannot express
     ├── HostError              exit 3   the host lacks something (binary, /dev/kvm, firmware)
     │    ├── NetworkError      exit 3   a network verb failed (name, definition, subnet)
     │    ├── NotPrivate        exit 3   a directory kvmrun would trust is another user's
     │    └── RemoteError       exit 3   another host cannot be reached, logged in to, or
     │                                   has no kvmrun (ssh's own failures, one line)
     ├── GuestError             exit 4   a guest is not in the state a command needs
     │    └── GuestTimeout      exit 5   a wait ran out (stop, wait, ready)
     │         └── AgentTimeout exit 5   the guest agent did not answer in time
     ├── QMPError               exit 6   QEMU's monitor refused or failed a command
     │    └── AgentError        exit 6   the guest agent refused a command (its class kept)
     ├── LaunchError            exit 7   QEMU failed to start (carries argv and QEMU's stderr)
     ├── MigrationError         exit 1   a migration failed or was refused (the source runs on)
     ├── StorageError           exit 1   a disk operation failed (qemu-img, space)
     │    ├── BadSize           exit 2   a disk size argument does not parse or is out of range
     │    └── PoolError         exit 1   a pool or volume operation failed
     │         └── NfsError     exit 1   an NFS export or volume (server, export, rights)
     ├── OsinfoError            exit 1   osinfo-db is missing, or has no such OS
     ├── UIError                exit 1   `kvmrun ui` cannot serve as asked (port, socket)
     │    └── ListenError       exit 2   a bad or non-loopback --listen
     └── StoreError             exit 1   the set of defined VMs (write failed, …)
          ├── InvalidName       exit 2   not a valid VM name
          ├── NotDefined        exit 2   no defined VM of that name
          ├── AlreadyDefined    exit 1   a different VM of that name exists
          └── Conflict          exit 1   the stored file changed while it was edited

The CLI (and the web UI) map each class to its exit code; library code raises, never exits.
Light: the supervisor imports this module.
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


class UsageError(KvmrunError):
    exit_code = 2


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


SHOWN = 60                  # characters of a bad value an error message echoes


def shown(value: object) -> str:
    """A value as an error message echoes it: repr, cut to SHOWN characters (a 1 MB value
    in a profile must not come back whole in the error)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value) if not isinstance(value, str) or len(value) <= 4 * SHOWN \
        else repr(value[: 4 * SHOWN])
    return text if len(text) <= SHOWN else f"{text[: SHOWN - 1]}…"


def close_matches(word: str, known: list[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The names in `known` closest to a mistyped `word` (difflib's), for a "did you mean"
    hint: difflib is imported only once there is a mistake (~1.5 ms of every start)."""
    import difflib
    return difflib.get_close_matches(word, known, n=n, cutoff=cutoff)


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


class ProfileErrors(ProfileError):
    """Several profile errors at once; str() lists them one per line."""

    def __init__(self, errors: list[ProfileError]):
        first = errors[0]
        super().__init__(first.location, first.reason, first.hint)
        self.errors = errors
        self.message = "\n".join(e.message for e in errors)
        self.hint = None if len(errors) > 1 else first.hint

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class LostSettings(ProfileError):
    """A libvirt domain uses settings kvmrun cannot express, and --lossy was not given."""

    def __init__(self, source: str, problems):
        lines = "\n".join(f"  {source}:{f.line}: {f}" if f.line else f"  {f}" for f in problems)
        super().__init__(Location(source), f"{len(problems)} setting(s) of this domain have no "
                                           f"kvmrun counterpart:\n{lines}",
                         hint="--lossy converts it anyway, without them")
        self.problems = problems


def each_error(error: ProfileError) -> list[ProfileError]:
    """The single errors of a ProfileError (one, or the list of a ProfileErrors)."""
    return error.errors if isinstance(error, ProfileErrors) else [error]


class HostError(KvmrunError):
    exit_code = 3


class NetworkError(HostError):
    """A network verb failed (bad name, not defined, overlapping subnet, in use)."""


class NotPrivate(HostError):
    """A directory kvmrun would put sockets and logs in is not this user's own (another
    owner, a link, a file): refused, as ssh refuses a loose ~/.ssh."""


class RemoteError(HostError):
    """`-H HOST`, a migration or an export --to could not reach HOST, log in there, or
    run kvmrun there (ssh exit 255, or the command not found)."""


class GuestError(KvmrunError):
    exit_code = 4


class GuestTimeout(GuestError):
    exit_code = 5


class QMPError(KvmrunError):
    """QEMU's monitor refused a command (`error_class` is QEMU's, e.g. GenericError,
    DeviceNotFound) or the connection failed (`error_class` None). Branch on the class,
    never on the text."""

    exit_code = 6

    def __init__(self, message: str, command: str | None = None,
                 error_class: str | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.command = command
        self.error_class = error_class


class AgentTimeout(GuestTimeout):
    """The guest agent did not answer within the deadline (not running, not installed, or
    another client holds the channel)."""


class AgentError(QMPError):
    """The guest agent answered a command with an error; its class and text are kept."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"the guest agent refused {command}: {desc} ({error_class})",
                         command=command, error_class=error_class)
        self.desc = desc


class LaunchError(KvmrunError):
    exit_code = 7

    def __init__(self, message: str, argv: list[str] | None = None, stderr: str = "",
                 hint: str | None = None, said_by: str = "qemu"):
        self.argv = argv or []
        self.stderr = stderr.strip()
        full = message
        if self.stderr:           # said_by: the program whose output it is (qemu, a helper)
            full += f"\n  {said_by} said: " + self.stderr.replace(
                "\n", "\n" + " " * (len(said_by) + 8))
        if self.argv:
            full += "\n  command: " + shlex.join(self.argv)
        super().__init__(full, hint)


class MigrationError(KvmrunError):
    """`kvmrun migrate` was refused by its preflight or failed; everything it made on the
    target was removed and the source guest keeps running."""


class StorageError(KvmrunError):
    """A disk operation failed (bad size, missing base, qemu-img refused, no space…)."""


class BadSize(StorageError):
    """A disk size given on the command line (`disk create --size`, `disk resize`) that
    does not parse or is out of range: a usage error, exit 2, like a bad profile value."""

    exit_code = 2


class PoolError(StorageError):
    """A pool or volume operation failed; `key` is the profile disk key it is about."""

    def __init__(self, message: str, hint: str | None = None, key: str = "pool"):
        super().__init__(message, hint)
        self.key = key


class NfsError(PoolError):
    """An NFS pool or volume operation failed (server unreachable, export refused, root
    squash…); the hint says what to check."""


class OsinfoError(KvmrunError):
    """osinfo-db is missing, or has no such OS (kvmrun os, kvmrun new --os)."""


class UIError(KvmrunError):
    """`kvmrun ui` cannot serve as asked (no aiohttp, port taken, a live socket)."""


class ListenError(UIError):
    """A --listen that is no HOST:PORT, or not loopback without --allow-remote."""

    exit_code = 2


class StoreError(KvmrunError):
    """Something about the set of defined VMs."""


class InvalidName(StoreError):
    exit_code = 2


class NotDefined(StoreError):
    exit_code = 2


class AlreadyDefined(StoreError):
    exit_code = 1


class Conflict(StoreError):
    """The stored file changed while it was being edited."""
