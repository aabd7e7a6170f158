"""Raw TPM 2.0 commands for the tiny guest, which has busybox and /dev/tpm0 but no tpm2-tools.

`nv_script(value)` is a busybox sh snippet that talks to /dev/tpm0 itself: it reads an NV
index of the owner hierarchy (TPM2_NV_Read); when the index is not there it defines it
(TPM2_NV_DefineSpace) and writes `value` (TPM2_NV_Write). It prints, on lines of their own,

    TPM-VERSION: <tpm_version_major from sysfs>
    TPM-NV: <the index's contents, hex>           the index was there (an earlier boot wrote it)
    TPM-NV-WRITTEN: <rc of define>,<rc of write>  it was not: defined and written now

Each command is a byte string written with printf's octal escapes in one write (the kernel's
TPM device takes a command per write and answers with a read). Password sessions (TPM_RS_PW)
with the owner's empty auth; commands and sizes per TPM 2.0 Part 3.
"""

from __future__ import annotations

import struct

NV_INDEX = 0x01500100
RH_OWNER = 0x40000001
RS_PW = 0x40000009
ST_SESSIONS = 0x8002
NV_DEFINE, NV_WRITE, NV_READ = 0x12A, 0x137, 0x14E
OWNERWRITE, OWNERREAD = 1 << 1, 1 << 17
SHA256 = 0x000B


def _command(code: int, handles: list[int], params: bytes) -> bytes:
    session = struct.pack(">IHBH", RS_PW, 0, 0, 0)          # empty nonce, attrs, password
    body = b"".join(struct.pack(">I", h) for h in handles) + \
        struct.pack(">I", len(session)) + session + params
    return struct.pack(">HII", ST_SESSIONS, 10 + len(body), code) + body


def define(size: int) -> bytes:
    public = struct.pack(">IHIHH", NV_INDEX, SHA256, OWNERWRITE | OWNERREAD, 0, size)
    return _command(NV_DEFINE, [RH_OWNER], struct.pack(">H", 0)
                    + struct.pack(">H", len(public)) + public)


def write(data: bytes) -> bytes:
    return _command(NV_WRITE, [RH_OWNER, NV_INDEX],
                    struct.pack(">H", len(data)) + data + struct.pack(">H", 0))


def read(size: int) -> bytes:
    return _command(NV_READ, [RH_OWNER, NV_INDEX], struct.pack(">HH", size, 0))


def _function(name: str, command: bytes) -> str:
    """A shell function that prints the command's bytes (printf's octal escapes)."""
    return f"{name}() {{ printf '" + "".join(f"\\{b:03o}" for b in command) + "'; }"


def nv_script(value: bytes) -> str:
    """The snippet (see the module docstring); `value` is what the first boot writes."""
    # a response: tag(2) size(4) rc(4); NV_Read's then parameterSize(4), TPM2B size(2), data
    return f"""
{_function("nv_read", read(len(value)))}
{_function("nv_define", define(len(value)))}
{_function("nv_write", write(value))}
tpm() {{ exec 3<>/dev/tpm0; $1 >&3; dd bs=4096 count=1 <&3 2>/dev/null | od -An -v -tx1 \\
    | tr -d ' \\n'; exec 3>&-; }}
echo "TPM-VERSION: $(cat /sys/class/tpm/tpm0/tpm_version_major 2>&1)"
got=$(tpm nv_read)
if [ "${{got:12:8}}" = 00000000 ]; then
    echo "TPM-NV: ${{got:32:{2 * len(value)}}}"
else
    d=$(tpm nv_define)
    w=$(tpm nv_write)
    echo "TPM-NV-WRITTEN: ${{d:12:8}},${{w:12:8}}"
fi
"""
