"""`kvmrun ssh`: the ssh command line that reaches a guest through its user-network port
forward to guest port 22."""

from __future__ import annotations

import re

from kvmrun.errors import GuestError

FWD_RE = re.compile(r"tcp:([\d.]*):(\d+)-[\d.]*:22$")
OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR")      # a fresh guest has a new host key every time


def ssh_argv(name: str, forwards: list[str], user: str | None = None,
             identity: str | None = None, command: list[str] = ()) -> list[str]:
    for fwd in forwards:
        m = FWD_RE.match(fwd)
        if m:
            addr = m.group(1) if m.group(1) not in ("", "0.0.0.0") else "127.0.0.1"
            argv = ["ssh", "-p", m.group(2), *OPTIONS]
            if identity:
                argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
            if user:
                argv += ["-l", user]
            argv.append(addr)
            if command:
                argv += ["--", *command]
            return argv
    raise GuestError(f"{name} has no port forward to guest port 22",
                     hint="add one to its profile: network: [{type: user, forward: "
                          "[\"2222:22\"]}]")
