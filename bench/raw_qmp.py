"""The raw baseline of a CLI round trip: connect to a QMP socket, run query-status, print it.

Standard library only, no kvmrun: what a bare script needs to ask QEMU one question.
Usage: python bench/raw_qmp.py QMP_SOCKET
"""

import json
import socket
import sys

with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(5)
    sock.connect(sys.argv[1])
    f = sock.makefile("rwb")
    json.loads(f.readline())                                    # greeting
    for command in ("qmp_capabilities", "query-status"):
        f.write(json.dumps({"execute": command}).encode() + b"\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                break
    print(json.dumps(reply["return"]))
