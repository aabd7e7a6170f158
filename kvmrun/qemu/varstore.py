"""What a UEFI variable store (an OVMF/AAVMF `*_VARS.fd` file) holds: whether Secure Boot's
platform key is enrolled. Without one the firmware is in setup mode and verifies nothing,
whatever code runs; a store made from the plain template (`OVMF_VARS_4M.fd`) has none.

edk2 keeps each variable behind an authenticated-variable header: StartId 0x55AA, State,
Reserved, Attributes, MonotonicCount, TimeStamp, PubKeyIndex, NameSize, DataSize (44 bytes),
then the vendor GUID and the UCS-2 name. PK is `PK` under EFI_GLOBAL_VARIABLE.
"""

from __future__ import annotations

import struct
from pathlib import Path

# 8be4df61-93ca-11d2-aa0d-00e098032b8c as EFI stores it (uuid.UUID(…).bytes_le; spelt out:
# the uuid module imports platform, ~3 ms of every start)
EFI_GLOBAL_VARIABLE = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
PK = EFI_GLOBAL_VARIABLE + "PK\0".encode("utf-16-le")
START_ID, VAR_ADDED = 0x55AA, 0x3F
GUID_OFFSET = 44                    # from the start of a variable's header


def platform_key_enrolled(store: Path) -> bool:
    """Whether the store holds a live (added, not deleted) PK variable with data."""
    data = store.read_bytes()
    at = data.find(PK)
    while at >= GUID_OFFSET:
        header = at - GUID_OFFSET
        start, state = struct.unpack_from("<HB", data, header)
        name_size, data_size = struct.unpack_from("<II", data, header + 36)
        if start == START_ID and state == VAR_ADDED and name_size == 6 and data_size > 0:
            return True
        at = data.find(PK, at + 1)
    return False
