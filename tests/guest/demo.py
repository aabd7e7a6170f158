#!/usr/bin/env python3
"""`make demo`: build the tiny guest if needed, start it, show its status and console,
stop it gracefully, show how it ended. Every step is a real `kvmrun` command, echoed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.guest.build import GuestBuildError, build_guest  # noqa: E402

KVMRUN = [sys.executable, "-m", "kvmrun"]


def step(*args: str, check: bool = True) -> int:
    print(f"\n$ kvmrun {shlex.join(args)}", flush=True)
    code = subprocess.call(KVMRUN + list(args), cwd=ROOT)
    if check and code != 0:
        print(f"demo: `kvmrun {shlex.join(args)}` failed (exit {code})", file=sys.stderr)
        sys.exit(code)
    return code


def link_guest() -> None:
    """build/guest/x86_64 -> the cached guest, replaced atomically."""
    try:
        image = build_guest("x86_64")
    except GuestBuildError as err:
        sys.exit(f"demo: cannot build the tiny guest: {err}")
    link = ROOT / "build" / "guest" / "x86_64"
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(".x86_64.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(image.kernel.parent)
    os.replace(tmp, link)
    print(f"demo: tiny guest ready in {image.kernel.parent}")


def main() -> None:
    link_guest()
    if subprocess.call(KVMRUN + ["wait", "demo", "--for", "running", "--timeout", "0"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        step("kill", "demo")                 # a demo left running by an interrupted run
    step("start", "profiles/demo.yaml")
    step("status", "demo")
    print("\n$ kvmrun logs demo  (the console's first lines)", flush=True)
    log = subprocess.run(KVMRUN + ["logs", "demo"], cwd=ROOT, capture_output=True, text=True)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", log.stdout)     # terminal queries
    print("\n".join(text.strip().splitlines()[:8]))
    step("stop", "demo")
    step("status", "demo")


if __name__ == "__main__":
    main()
