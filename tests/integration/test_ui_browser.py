"""`kvmrun ui` in a real browser (Debian's headless Chromium over the DevTools protocol)
against a real server and the real tiny guest under TCG.

One server, one browser and one defined guest are shared by the module's tests, which run
in order: the guards (token, Origin), the live list, the console, a stop from the CLI seen
live, the start and stop buttons, then the New VM form (a second guest, with a VNC display)
and its display. Screenshots of each page go to build/ui-screenshots/ (git-ignored).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, KvmrunEnv

cdp = pytest.importorskip("tests.integration.cdp")
websockets = pytest.importorskip("websockets")
pytest.importorskip("aiohttp")

pytestmark = [pytest.mark.qemu, pytest.mark.slow,
              pytest.mark.skipif(not cdp.SHELL.exists(),
                                 reason="chromium-headless-shell is not installed")]
SHOTS = REPO / "build" / "ui-screenshots"
NAME = "tiny"
PROCS: dict = {}                 # the running `kvmrun ui` (the last test replaces it)


@pytest.fixture(scope="module")
def env():
    base = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    kv = KvmrunEnv(base)
    try:
        yield kv
    finally:
        kv.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(env):
    """`kvmrun ui` on a free loopback port; (base URL, token). It stops by itself."""
    proc = env.popen("ui", "--listen", "127.0.0.1:0", "--exit-after", "900")
    line = proc.stdout.readline().decode()
    assert line.startswith("kvmrun ui: http://127.0.0.1:"), (line, proc.stderr.read())
    url = line.split()[2]
    base, token = url.split("/?token=")
    PROCS["server"] = proc
    yield base, token
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(server):
    b = cdp.Browser()
    try:
        base, token = server
        b.goto(f"{base}/?token={token}")            # the token becomes a cookie
        b.wait_for("location.search === '' && document.querySelector('#guests')",
                   what="the guests page, token gone from the address")
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def tiny(env, tiny_guest):
    """The tiny guest's profile file (not a defined VM: the page restarts it from the file
    its state names)."""
    env.profile(NAME, tiny_guest)
    return NAME


def _request(url, method="GET", headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_requests_without_the_token_get_403(server):
    base, token = server
    cookie = {"Cookie": f"kvmrun_token={token}"}
    assert _request(f"{base}/")[0] == 403
    assert _request(f"{base}/api/guests")[0] == 403
    assert _request(f"{base}/api/guests", headers={"Cookie": "kvmrun_token=wrong"})[0] == 403
    status, body = _request(f"{base}/api/guests", headers=cookie)
    assert status == 200 and json.loads(body)["ok"]
    # state changes also need this server's own Origin (a form on another site has the
    # cookie withheld by SameSite, and is refused here even if it had it)
    assert _request(f"{base}/api/guests/{NAME}/kill", "POST", cookie)[0] == 403
    evil = {**cookie, "Origin": "http://evil.example"}
    status, body = _request(f"{base}/api/guests/{NAME}/kill", "POST", evil)
    assert status == 403 and "cross-origin" in body
    rebound = {**cookie, "Host": "evil.example:80"}
    assert _request(f"{base}/api/guests", headers=rebound)[0] == 403


def test_a_websocket_from_another_origin_is_refused(server):
    base, token = server
    ws_url = base.replace("http://", "ws://") + f"/ws/console/{NAME}"
    cookie = [("Cookie", f"kvmrun_token={token}")]
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(ws_url, origin="http://evil.example",
                                       additional_headers=cookie, open_timeout=30)
    assert refused.value.response.status_code == 403
    # the same request from the page's own origin is let through (the refusal is the Origin)
    with websockets.sync.client.connect(ws_url, origin=base, additional_headers=cookie,
                                        open_timeout=30) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as closed:
            ws.recv(timeout=30)                      # accepted, then: no guest running yet
    assert closed.value.rcvd.code == 4004 and "no console" in closed.value.rcvd.reason


def _row_state(browser, name: str) -> str | None:
    return browser.js(f"document.querySelector('tr[data-name={json.dumps(name)}]')"
                      f"?.dataset.state ?? null")


def test_the_list_shows_a_guest_started_from_the_cli(env, browser, tiny):
    browser.js("location.hash = '#/'; window.kvmrunNoReload = true")
    browser.wait_for("document.querySelector('#guests tbody tr')", what="the table")
    assert _row_state(browser, tiny) is None
    env.ok("start", env.base / f"{tiny}.yaml")      # from the command line, not the page
    browser.wait_for(f"{json.dumps(tiny)} && document.querySelector("
                     f"'tr[data-name={json.dumps(tiny)}]').dataset.state === 'running'",
                     what="state running without a reload")
    assert browser.js("window.kvmrunNoReload") is True
    assert browser.js("document.querySelector('#live').textContent") == "live"
    browser.screenshot(SHOTS / "guests.png")


def _terminal_lines(browser) -> list[str]:
    return browser.js("""(() => { const b = window.kvmrunTerminal.buffer.active, out = [];
        for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
        return out; })()""")


def test_typing_in_the_browser_console_reaches_the_guest(browser, tiny):
    browser.js(f"location.hash = '#/guest/{tiny}'")
    browser.wait_for("window.kvmrunTerminal && document.querySelector('.xterm-helper-textarea')",
                     what="xterm.js opened")
    browser.wait_for("(() => { const b = window.kvmrunTerminal.buffer.active; let t = '';"
                     "for (let i = 0; i < b.length; i++) t += b.getLine(i).translateToString(true);"
                     "return t.includes('KVMRUN-GUEST-READY'); })()", timeout=180,
                     what="the guest's ready marker in the page's console")
    browser.js("document.querySelector('.xterm-helper-textarea').focus()")
    browser.press_enter()
    browser.type_text("echo hello-from-browser")
    browser.press_enter()
    browser.wait_for("(() => { const b = window.kvmrunTerminal.buffer.active;"
                     "for (let i = 0; i < b.length; i++)"
                     "  if (b.getLine(i).translateToString(true).trim() === 'hello-from-browser')"
                     "    return true; return false; })()", timeout=60,
                     what="the guest's echo (a line that is just hello-from-browser)")
    lines = _terminal_lines(browser)
    assert any("echo hello-from-browser" in line for line in lines)   # the typed command
    browser.wait_for("document.querySelector('#status')", what="the status panel")
    browser.screenshot(SHOTS / "console.png")


def test_a_second_viewer_shares_the_console(server, browser, tiny):
    """Another viewer (a websocket from the page's origin) types; both see the echo."""
    base, token = server
    with websockets.sync.client.connect(
            base.replace("http://", "ws://") + f"/ws/console/{tiny}", origin=base,
            additional_headers=[("Cookie", f"kvmrun_token={token}")], open_timeout=30) as ws:
        ws.recv(timeout=30)                              # the tail of serial.log
        ws.send(b"echo second-$((40+2))\r")
        seen = b""
        while b"second-42" not in seen:
            seen += ws.recv(timeout=30)
    browser.wait_for("(() => { const b = window.kvmrunTerminal.buffer.active;"
                     "for (let i = 0; i < b.length; i++)"
                     "  if (b.getLine(i).translateToString(true).trim() === 'second-42')"
                     "    return true; return false; })()", timeout=60,
                     what="the other viewer's command echoed in the page too")


def test_a_stop_from_the_cli_shows_live(env, browser, tiny):
    browser.js("location.hash = '#/'")
    browser.wait_for(f"document.querySelector('tr[data-name={json.dumps(tiny)}]')")
    env.ok("stop", tiny)
    browser.wait_for(f"document.querySelector('tr[data-name={json.dumps(tiny)}]')"
                     ".dataset.state === 'stopped'", what="state stopped without a reload")
    assert browser.js("window.kvmrunNoReload") is True


def test_the_start_and_stop_buttons(env, browser, tiny):
    row = f"tr[data-name={json.dumps(tiny)}]"
    browser.click(f"{row} button[data-action=start]")
    browser.wait_for(f"document.querySelector('{row}').dataset.state === 'running'",
                     timeout=180, what="running after the start button")
    env.wait_state(tiny, lambda s: s.get("ready") or "KVMRUN-GUEST-READY" in Path(
        s["serial_log"]).read_text(errors="replace"), timeout=180)
    browser.click(f"{row} button[data-action=stop]")
    browser.wait_for(f"document.querySelector('{row}').dataset.state === 'stopped'",
                     timeout=120, what="stopped after the stop button")
    ended = env.status(tiny)["ended"]
    assert ended["reason"] == "stopped" and ended["stage"] == "acpi", ended  # gracefully
    assert "powering off" in Path(env.status(tiny)["serial_log"]).read_text(errors="replace")


def _fill(browser, values: dict) -> None:
    """Set form fields as a user would (value, then the input and change events)."""
    for name, value in values.items():
        browser.js(f"""(() => {{ const el = document.querySelector('main [name={name}]');
            if (el.type === 'checkbox') el.checked = {json.dumps(bool(value))};
            else el.value = {json.dumps(value)};
            el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }})()""")


def test_the_new_vm_form_defines_a_vm_that_boots(env, browser, tiny_guest):
    """Errors as the CLI words them; OS search pre-fills; the edited profile validates,
    is defined (`kvmrun validate` accepts it) and boots to the tiny guest's marker."""
    browser.js("location.hash = '#/new'")
    browser.wait_for("document.querySelectorAll('#new-vm [name=os_id] option').length > 10",
                     what="the OS list from osinfo-db")
    # an error shows as the very message the CLI prints
    _fill(browser, {"name": "formvm", "mode": "cdrom", "cdrom": "/nonexistent/x.iso"})
    browser.click("#preview")
    browser.wait_for("!document.querySelector('#error').hidden", what="the error banner")
    cli = env.run("new", "formvm", "--cdrom", "/nonexistent/x.iso", "--print")
    assert cli.code == 2
    assert browser.js("document.querySelector('#error').textContent") == cli.err.strip()
    _fill(browser, {"cdrom": "", "mode": "kernel", "kernel": str(tiny_guest.kernel),
                    "initrd": str(tiny_guest.initrd),
                    "append": f"console={tiny_guest.console} quiet",
                    "os_search": "debian 11"})
    assert browser.js("document.querySelector('[name=cdrom]').offsetParent === null")  # hidden
    browser.wait_for("document.querySelector('#new-vm [name=os_id]').value === 'debian11'",
                     what="the search picked Debian 11")
    assert browser.js("document.querySelector('#new-vm [name=disk]').placeholder") == "20G"
    _fill(browser, {"memory": "256M", "disk": "none", "network": "none"})
    browser.click("#preview")
    browser.wait_for("document.querySelector('#yaml').value.includes('name: formvm')",
                     what="the profile made by new_profile")
    assert "qemu-system-x86_64" in browser.js("document.querySelector('#new-cmdline').textContent")
    # the last step lets the user edit the profile: give it a VNC display
    browser.js("const y = document.querySelector('#yaml'); y.value += 'display: vnc\\n'")
    browser.click("#validate")
    browser.wait_for("document.querySelector('#valid')", what="validated")
    assert "-vnc" in browser.js("document.querySelector('#new-cmdline').textContent")
    browser.screenshot(SHOTS / "new-vm.png")
    _fill(browser, {"start": True})
    browser.click("#define")
    browser.wait_for("document.querySelector('#defined')", timeout=120, what="defined")
    assert "created formvm" in browser.js("document.querySelector('#defined').textContent")
    assert env.ok("validate", "formvm").out.strip() == "formvm: ok"
    stored = (env.base / "config" / "vms" / "formvm.yaml").read_text()
    assert "display: vnc" in stored and "Debian 11" in stored
    env.wait_state("formvm", lambda s: "KVMRUN-GUEST-READY" in Path(
        s["serial_log"]).read_text(errors="replace"), timeout=180)


def test_the_vnc_display_renders_what_screendump_shows(env, browser):
    browser.js("location.hash = '#/guest/formvm'")
    browser.wait_for("document.querySelector('#display canvas')?.width > 100", timeout=60,
                     what="noVNC's canvas with the guest's framebuffer size")
    canvas_pixels = """(() => { const c = document.querySelector('#display canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return d; })()"""
    # not blank: more than one colour on the canvas (the VGA text of the firmware and kernel)
    browser.wait_for(f"(() => {{ const d = {canvas_pixels}; const s = new Set();"
                     "for (let i = 0; i < d.length; i += 4) s.add(d[i] << 16 | d[i+1] << 8 | d[i+2]);"
                     "return s.size > 1; })()", timeout=60, what="a canvas that is not blank")
    browser.click("#screenshot")
    browser.wait_for("document.querySelector('#screendump')?.complete && "
                     "document.querySelector('#screendump').naturalWidth > 0", timeout=60,
                     what="the QMP screendump PNG in the page")
    same = browser.js(f"""(() => {{
        const c = document.querySelector('#display canvas'), img = document.querySelector('#screendump');
        if (img.naturalWidth !== c.width || img.naturalHeight !== c.height)
            return `sizes differ: ${{img.naturalWidth}}x${{img.naturalHeight}} vs ${{c.width}}x${{c.height}}`;
        const o = document.createElement('canvas'); o.width = c.width; o.height = c.height;
        const ctx = o.getContext('2d'); ctx.drawImage(img, 0, 0);
        const a = ctx.getImageData(0, 0, c.width, c.height).data, b = {canvas_pixels};
        let equal = 0;
        for (let i = 0; i < a.length; i += 4)
            if (Math.abs(a[i] - b[i]) + Math.abs(a[i+1] - b[i+1]) + Math.abs(a[i+2] - b[i+2]) < 24) equal++;
        return equal / (a.length / 4); }})()""")
    assert isinstance(same, (int, float)) and same > 0.95, same   # a cursor may blink between
    browser.js("document.querySelector('#display').scrollIntoView()")
    browser.screenshot(SHOTS / "display.png")
    env.ok("kill", "formvm")


def test_networks_and_storage_pages_define_through_the_library(env, browser):
    browser.js("location.hash = '#/networks'")
    browser.wait_for("document.querySelector('main h1')?.textContent === 'Networks'")
    browser.js("""(() => { const [name, , subnet] = document.querySelectorAll('main .row input, main .row select');
        name.value = 'lab1'; })()""")
    browser.click("main .row button")
    browser.wait_for("document.querySelector('tr[data-name=lab1]')", what="the new network")
    assert any(n["name"] == "lab1" for n in json.loads(env.ok("net", "list", "--json").out))
    browser.screenshot(SHOTS / "networks.png")
    pool_dir = env.base / "pool1"
    pool_dir.mkdir()
    env.ok("disk", "create", str(pool_dir / "data.qcow2"), "--size", "1G")
    browser.js("location.hash = '#/storage'")
    browser.wait_for("document.querySelector('main h1')?.textContent === 'Storage'")
    browser.js(f"""(() => {{ const [name, path] = document.querySelectorAll('main .row input');
        name.value = 'pool1'; path.value = {json.dumps(str(pool_dir))}; }})()""")
    browser.click("main .row button")
    browser.wait_for("document.querySelector('section[data-pool=pool1] td')?.textContent === "
                     "'data.qcow2'", what="the pool and its volume")
    assert "pool1" in env.ok("pool", "list").out
    browser.screenshot(SHOTS / "storage.png")


def test_snapshots_from_the_guest_page(env, browser, tiny_guest):
    """A defined VM that never ran, with a qcow2 disk: take and delete a snapshot from its
    page (qemu-img while stopped); the CLI sees the same snapshots."""
    disk = env.base / "snap.qcow2"
    env.ok("disk", "create", str(disk), "--size", "64M")
    env.ok("define", env.profile("snapvm", tiny_guest, disks=[{"path": str(disk)}]))
    browser.js("window.confirm = () => true; location.hash = '#/guest/snapvm'")
    browser.wait_for("document.querySelector('#snapshots td')?.textContent === 'No snapshots.'",
                     what="the empty snapshot list of a VM that never ran")
    assert browser.js("document.querySelector('#error').hidden") is True
    browser.js("document.querySelector('#snap-name').value = 'first'")
    browser.click("#snap-create")
    browser.wait_for("document.querySelector('#snapshots tr[data-snap=first]')",
                     what="the new snapshot listed")
    listed = json.loads(env.ok("snapshot", "list", "snapvm", "--json").out)
    assert [s["name"] for s in listed] == ["first"] and listed[0]["disks"] == [str(disk)]
    browser.click("#snapshots tr[data-snap=first] button[data-snap-action=delete]")
    browser.wait_for("!document.querySelector('#snapshots tr[data-snap=first]')",
                     what="the snapshot gone")
    assert json.loads(env.ok("snapshot", "list", "snapvm", "--json").out) == []


def test_the_page_reconnects_to_a_restarted_server(env, server, browser):
    """Last (it replaces the module's server): stop the server, start one with the same
    token on the same port; the open page goes back to live without a reload."""
    base, token = server
    browser.js("location.hash = '#/'; window.kvmrunNoReload = true")
    browser.wait_for("document.querySelector('#live').textContent === 'live'")
    PROCS["server"].terminate()
    assert PROCS["server"].wait(timeout=30) == 0
    browser.wait_for("document.querySelector('#live').textContent !== 'live'",
                     what="the page noticed the server is gone")
    env.env["KVMRUN_UI_TOKEN"] = token
    again = env.popen("ui", "--listen", base.removeprefix("http://"), "--exit-after", "300")
    assert again.stdout.readline().decode().startswith(f"kvmrun ui: {base}/?token={token}")
    browser.wait_for("document.querySelector('#live').textContent === 'live'", timeout=60,
                     what="live again (EventSource reconnected with the cookie)")
    assert browser.js("window.kvmrunNoReload") is True
    browser.wait_for("document.querySelector('tr[data-name=snapvm]')")
