"""A headless Chromium driven over the DevTools protocol: no Selenium, no driver download.

The browser is Debian's `chromium-headless-shell`, started directly (its /usr/bin wrapper
does not exec, so killing the wrapper would leave the browser): it writes the port of its
DevTools websocket to DIR/DevToolsActivePort; one page target is attached with
`flatten`, so every command is sent on the browser's one websocket with a session id.
The browser is ended through its own `Browser.close`, then by PID if it lingers.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

SHELL = Path("/usr/lib/chromium/chromium-headless-shell")


class CDPError(Exception):
    pass


class Browser:
    def __init__(self, width: int = 1280, height: int = 900):
        if not SHELL.exists():
            raise FileNotFoundError(f"{SHELL} (Debian package chromium-headless-shell)")
        self.dir = Path(tempfile.mkdtemp(prefix="kvmrun-chromium-"))
        self.proc = subprocess.Popen(
            [str(SHELL), "--no-sandbox", "--headless", "--remote-debugging-port=0",
             f"--user-data-dir={self.dir}", f"--window-size={width},{height}",
             "--disable-gpu", "--no-first-run", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise CDPError("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        self._connection = connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20,
                                   open_timeout=30)
        self.ws = self._connection.__enter__()
        self._id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)

    # ------------------------------------------------------------ protocol
    def send(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, session=True)

    # ------------------------------------------------------------ conveniences
    def goto(self, url: str) -> None:
        self.page("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def js(self, expression: str):
        """Evaluate in the page (promises awaited); the value, or CDPError for a throw."""
        result = self.page("Runtime.evaluate", {"expression": expression,
                                                "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r}: {result['exceptionDetails'].get('text')} "
                           f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str | None = None):
        """Poll `expression` until it is truthy (in JavaScript's sense)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.js(f"Boolean({expression})")
            except CDPError as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"never true within {timeout}s: {what or expression} "
                             f"(last: {last!r})")

    def click(self, selector: str) -> None:
        self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                f"if (!el) throw new Error('no ' + {json.dumps(selector)}); el.click(); }})()")

    def type_text(self, text: str) -> None:
        self.page("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", {
                "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
                **({"text": "\r"} if kind == "keyDown" else {})})

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.page("Page.captureScreenshot", {"format": "png"})["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.send("Browser.close", timeout=10)
                except Exception:      # noqa: BLE001 - it may already be gone
                    pass
                self._connection.__exit__(None, None, None)
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()                  # our own child, by its PID
                self.proc.wait(timeout=10)
            shutil.rmtree(self.dir, ignore_errors=True)
