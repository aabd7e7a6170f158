"""The client side of NFS pools: libnfs through ctypes (libnfs.so.13, as QEMU's NFS driver
uses it) for what qemu-img has no verb for -- listing a directory with sizes, capacity and
free space, deleting, placing a new image without overwriting -- and the messages of NFS
clients (libnfs, qemu-img, mount.nfs) turned into one plain error each.

Every libnfs call runs with a timeout, so a dead server gives an error, not a hang.
ctypes (~25 ms with ctypes.util) is imported on the first libnfs call only: images and pools
import this module for its URL helpers, and `kvmrun --help` imports those."""

from __future__ import annotations

from kvmrun.errors import HostError, KvmrunError, NfsError

SCHEME = "nfs://"
TIMEOUT_MS = 10000                                        # per libnfs call


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def url(server: str, export: str, volume: str = "") -> str:
    base = f"{SCHEME}{server}{export.rstrip('/')}"
    return f"{base}/{volume}" if volume else base


def split_url(address: str) -> tuple[str, str, str]:
    """nfs://SERVER/DIR/NAME -> (server, '/dir', 'name'); query strings are not used."""
    rest = address[len(SCHEME):].split("?", 1)[0]
    server, _, path = rest.partition("/")
    folder, _, name = ("/" + path).rpartition("/")
    return server, folder or "/", name


# ---------------------------------------------------------------- errors

def explain(text: str, what: str) -> NfsError | HostError:
    """A libnfs / qemu-img / mount.nfs message as one plain error with a hint."""
    text = " ".join(line.removeprefix("qemu-img: ").strip()
                    for line in (text or "").strip().splitlines()) or "no message"
    low = text.lower()
    if "unknown protocol 'nfs'" in low or "unknown driver 'nfs'" in low:
        return HostError(f"{what}: QEMU's NFS block driver is not installed",
                         hint="apt-get install qemu-block-extra")
    if "mnt3err_acces" in low or "mnt3err_noent" in low or "access denied by server" in low \
            or ("no such file or directory" in low and "mount" in low):
        return NfsError(f"{what}: the server refuses to mount the export ({text})",
                        hint="is the export name right, and does the server export it to "
                             "this host? (showmount -e SERVER, or the server's exports)")
    if "nfs_service failed" in low or "portmap" in low or "rpcbind" in low \
            or "getport" in low or ("111" in low and "refused" in low):
        return NfsError(f"{what}: the server's rpcbind (port 111) does not answer ({text})",
                        hint="is the NFS server running? QEMU's NFS client speaks NFSv3, "
                             "which needs rpcbind on the server: start it (systemctl start "
                             "rpcbind) or open port 111")
    if "refused" in low or "unreachable" in low or "timed out" in low or "timeout" in low \
            or "no route" in low or "failed to connect" in low or "resolve" in low:
        return NfsError(f"{what}: cannot reach the NFS server ({text})",
                        hint="is the server up and reachable from here (ports 111 and "
                             "2049)? check the name in the pool's --source")
    if "nfs3err_acces" in low or "permission denied" in low or "nfs3err_perm" in low \
            or "nfs3err_rofs" in low:
        return NfsError(f"{what}: permission denied by the NFS server ({text})",
                        hint="the server may map root to nobody (root_squash): export with "
                             "no_root_squash, or make the directory writable for that user")
    if "nfs3err_noent" in low:
        return NfsError(f"{what}: no such file on the NFS server ({text})")
    if "nfs3err_exist" in low or "file exists" in low:
        return NfsError(f"{what}: it exists already ({text})")
    if "nfs3err_nospc" in low or "no space" in low:
        return NfsError(f"{what}: the NFS server has no space left ({text})")
    return NfsError(f"{what}: {text}")


# ---------------------------------------------------------------- libnfs through ctypes

NF3REG = 1
_lib = None
_C = None                  # ctypes, once loaded
_T: dict = {}              # the structures: dirent (its stable head), stat64, statvfs64


def _types(ctypes) -> dict:
    class Dirent(ctypes.Structure):
        pass

    Dirent._fields_ = [("next", ctypes.POINTER(Dirent)), ("name", ctypes.c_char_p),
                       ("inode", ctypes.c_uint64), ("type", ctypes.c_uint32),
                       ("mode", ctypes.c_uint32), ("size", ctypes.c_uint64)]

    class Stat64(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in (
            "dev", "ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks",
            "atime", "mtime", "ctime", "atime_nsec", "mtime_nsec", "ctime_nsec", "used")]

    class Statvfs64(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in (
            "bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail",
            "fsid", "flag", "namemax")]
    return {"dirent": Dirent, "stat64": Stat64, "statvfs64": Statvfs64}


def _libnfs():
    global _lib, _C
    if _lib is None:
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("nfs") or "libnfs.so.13"
        try:
            lib = ctypes.CDLL(name)
        except OSError as err:
            raise HostError("libnfs is not installed",
                            hint="apt-get install libnfs13 (it comes with qemu-block-extra)"
                            ) from err
        _T.update(_types(ctypes))
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for fn, args, res in (
                ("nfs_init_context", [], vp), ("nfs_destroy_context", [vp], None),
                ("nfs_get_error", [vp], cp), ("nfs_set_timeout", [vp, i], None),
                ("nfs_set_version", [vp, i], i), ("nfs_mount", [vp, cp, cp], i),
                ("nfs_opendir", [vp, cp, ctypes.POINTER(vp)], i),
                ("nfs_readdir", [vp, vp], ctypes.POINTER(_T["dirent"])),
                ("nfs_closedir", [vp, vp], None),
                ("nfs_stat64", [vp, cp, ctypes.POINTER(_T["stat64"])], i),
                ("nfs_statvfs64", [vp, cp, ctypes.POINTER(_T["statvfs64"])], i),
                ("nfs_unlink", [vp, cp], i), ("nfs_link", [vp, cp, cp], i)):
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, res
        _C, _lib = ctypes, lib
    return _lib


class Export:
    """One mounted libnfs context on SERVER:EXPORT (NFSv3, as QEMU uses), as a context
    manager. Paths are relative to the export's root."""

    def __init__(self, server: str, export: str):
        self.server, self.export, self.lib, self.ctx = server, export, _libnfs(), None

    def __enter__(self) -> "Export":
        self.ctx = self.lib.nfs_init_context()
        if not self.ctx:
            raise NfsError("cannot start libnfs (out of memory?)")
        self.lib.nfs_set_timeout(self.ctx, TIMEOUT_MS)
        if self.lib.nfs_mount(self.ctx, self.server.encode(), self.export.encode()) != 0:
            err = self._error(f"cannot mount {self.server}:{self.export}")
            self.close()
            raise err
        return self

    def close(self) -> None:
        if self.ctx:
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = None

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, what: str) -> KvmrunError:
        message = self.lib.nfs_get_error(self.ctx)
        return explain(message.decode(errors="replace") if message else "", what)

    def _path(self, name: str) -> bytes:
        return ("/" + name.lstrip("/")).encode()

    def listdir(self, folder: str = "") -> list[dict]:
        handle = _C.c_void_p()
        if self.lib.nfs_opendir(self.ctx, self._path(folder), _C.byref(handle)) != 0:
            raise self._error(f"cannot list {self.server}:{self.export}")
        rows = []
        try:
            while True:
                entry = self.lib.nfs_readdir(self.ctx, handle)
                if not entry:
                    break
                e = entry.contents
                rows.append({"name": e.name.decode(errors="replace"), "size": e.size,
                             "file": e.type == NF3REG})
        finally:
            self.lib.nfs_closedir(self.ctx, handle)
        return sorted(rows, key=lambda r: r["name"])

    def stat(self, name: str) -> dict | None:
        st = _T["stat64"]()
        if self.lib.nfs_stat64(self.ctx, self._path(name), _C.byref(st)) != 0:
            err = self._error(f"cannot look at {name}")
            if "noent" in err.message.lower():
                return None
            raise err
        return {"size": st.size, "mode": st.mode, "used": st.used}

    def statvfs(self) -> dict:
        st = _T["statvfs64"]()
        if self.lib.nfs_statvfs64(self.ctx, b"/", _C.byref(st)) != 0:
            raise self._error(f"cannot read the space of {self.server}:{self.export}")
        return {"capacity": st.blocks * st.frsize, "free": st.bavail * st.frsize}

    def unlink(self, name: str) -> None:
        if self.lib.nfs_unlink(self.ctx, self._path(name)) != 0:
            raise self._error(f"cannot delete {url(self.server, self.export, name)}")

    def link(self, old: str, new: str) -> None:
        """A second name for `old`; fails (NFS3ERR_EXIST) rather than replace `new`."""
        if self.lib.nfs_link(self.ctx, self._path(old), self._path(new)) != 0:
            raise self._error(f"cannot create {url(self.server, self.export, new)}")


def export_of(address: str) -> Export:
    """The libnfs context for the directory holding the file an nfs:// URL names; the
    file is then `split_url(address)[2]` inside it."""
    server, folder, _ = split_url(address)
    return Export(server, folder)


def exists(address: str) -> bool:
    with export_of(address) as ex:
        return ex.stat(split_url(address)[2]) is not None


def unlink(address: str, missing_ok: bool = False) -> None:
    with export_of(address) as ex:
        name = split_url(address)[2]
        if missing_ok and ex.stat(name) is None:
            return
        ex.unlink(name)


def place(tmp: str, final: str) -> None:
    """Give the finished image `tmp` its name `final` (same folder), never replacing a
    file, then drop the temporary name."""
    with export_of(final) as ex:
        try:
            ex.link(split_url(tmp)[2], split_url(final)[2])
        except NfsError as err:
            if "exists" in err.message:
                raise NfsError(f"{final} already exists") from None
            raise
        ex.unlink(split_url(tmp)[2])
