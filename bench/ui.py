#!/usr/bin/env python3
"""`kvmrun ui` in the browser (never part of `make test`): how long the Guests page takes to
show N guests, and how long a console keystroke takes to come back as the guest's echo.

    page load   N defined VMs (default 50) plus one running tiny guest; headless Chromium
                navigates to the page; the figure is the page's own performance.now() when
                the list is first drawn (window.kvmrunListShown, set by app.js), i.e. from
                navigation start, through the HTML, the scripts and the first server-sent
                event, to the rows in the DOM. --loads runs, median (min-max).
    keystroke   on the guest's page, xterm.js's term.input('x') (what a key press does), timed
                in the page until xterm has parsed the next data the websocket brought (the
                guest's tty echo, through the server's console bridge and QEMU's socket);
                --keys keystrokes, median (min-max).

Everything runs under /tmp/kb-ui-XXXX; the server stops by itself and every process the
benchmark started is killed by identified PID at the end (tests/integration/conftest.py).

Usage: python bench/ui.py [--guests 50] [--loads 10] [--keys 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.guest.build import build_guest                     # noqa: E402
from tests.integration import cdp                             # noqa: E402
from tests.integration.conftest import KvmrunEnv              # noqa: E402

KEYS_JS = """(async (n) => {
  const term = window.kvmrunTerminal, times = [];
  for (let i = 0; i < n; i++) {
    const echoed = new Promise((res) => { const d = term.onWriteParsed(() => { d.dispose(); res(); }); });
    const t0 = performance.now();
    term.input('x', true);
    await echoed;
    times.push(performance.now() - t0);
    await new Promise((res) => setTimeout(res, 20));
  }
  const b = term.buffer.active, line = b.getLine(b.baseY + b.cursorY).translateToString(true);
  term.input('\\x15', true);                       // Ctrl-U: clear the typed line
  return {times, echoed: (line.match(/x/g) || []).length}; })(%d)"""


def figure(values: list[float]) -> str:
    return (f"{statistics.median(values):.1f} ms ({min(values):.1f}-{max(values):.1f}), "
            f"n={len(values)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=50)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--keys", type=int, default=50)
    args = ap.parse_args()
    guest = build_guest("x86_64", "default")
    base = Path(tempfile.mkdtemp(prefix="kb-ui-", dir="/tmp"))
    env = KvmrunEnv(base)
    browser = None
    try:
        env.ok("define", env.profile("g00", guest))
        for i in range(1, args.guests):
            env.ok("define", env.profile(f"g{i:02d}", guest))
        env.ok("start", "g00")
        proc = env.popen("ui", "--listen", "127.0.0.1:0", "--exit-after", "1800")
        url = proc.stdout.readline().decode().split()[2]
        browser = cdp.Browser()
        browser.goto(url)
        loads = []
        for _ in range(args.loads):
            browser.goto(url.split("?")[0])
            browser.wait_for(f"document.querySelectorAll('#guests tr[data-name]').length "
                             f"=== {args.guests}", timeout=60)
            loads.append(browser.js("window.kvmrunListShown"))
        browser.js("location.hash = '#/guest/g00'")
        browser.wait_for("window.kvmrunTerminal && (() => { const b = window.kvmrunTerminal"
                         ".buffer.active; for (let i = 0; i < b.length; i++) if (b.getLine(i)"
                         ".translateToString(true).includes('KVMRUN-GUEST-READY')) return true;"
                         " return false; })()", timeout=180)
        time.sleep(1)
        probe = browser.js(KEYS_JS % args.keys)
        keys = probe["times"]
        if probe["echoed"] != args.keys:          # each timing must have been the echo
            raise SystemExit(f"the console line shows {probe['echoed']} of {args.keys} x's")
        result = {"guests": args.guests, "page_load_ms": loads, "keystroke_echo_ms": keys}
        print(f"guests page with {args.guests} guests, navigation -> rows drawn: "
              f"{figure(loads)}   target < 300 ms")
        print(f"console keystroke -> guest's echo drawn: {figure(keys)}   target < 50 ms")
        out = REPO / "bench" / "results" / "ui.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if browser is not None:
            browser.close()
        env.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
