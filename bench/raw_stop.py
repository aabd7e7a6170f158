"""The raw baseline of a stop: system_powerdown over QMP, then wait for QEMU to exit.

Standard library only, no kvmrun. Waits on a pidfd (like `kvmrun stop`), re-sending the
request every 5 s as `kvmrun stop` does for guests that miss it while booting.
Usage: python bench/raw_stop.py QMP_SOCKET QEMU_PID [TIMEOUT]
"""

import json
import os
import select
import socket
import sys
import time

path, pid = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
pidfd = os.pidfd_open(pid)
deadline = time.monotonic() + timeout
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(5)
    sock.connect(path)
    f = sock.makefile("rwb")
    json.loads(f.readline())                                    # greeting
    f.write(b'{"execute": "qmp_capabilities"}\n')
    f.flush()
    f.readline()
    while True:
        try:
            f.write(b'{"execute": "system_powerdown"}\n')
            f.flush()
        except OSError:
            pass                                                # QEMU is going away
        left = deadline - time.monotonic()
        if left <= 0:
            sys.exit("QEMU did not exit in time")
        if select.select([pidfd], [], [], min(5.0, left))[0]:
            break
