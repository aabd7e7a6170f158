// One guest: its status (as `kvmrun status`), buttons, the serial console (xterm.js over
// /ws/console/NAME), the VNC display (noVNC over /ws/vnc/NAME), a screenshot, the log, the
// profile and the QEMU command line.
import { api, attempt, h, duration, mib } from "./util.js";
import { actionButtons } from "./actions.js";

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}

async function openConsole(box, name) {
  const { Terminal } = await import("./vendor/xterm/xterm.mjs");
  const { FitAddon } = await import("./vendor/xterm/addon-fit.mjs");
  const term = new Terminal({convertEol: false, fontSize: 13, scrollback: 5000});
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  window.kvmrunTerminal = term;              // for tests and the curious
  let ws = null, closed = false;
  const encoder = new TextEncoder();
  const connect = () => {
    ws = new WebSocket(wsUrl(`/ws/console/${encodeURIComponent(name)}`));
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => term.write(new Uint8Array(ev.data));
    ws.onclose = (ev) => {
      if (closed) return;
      term.write(`\r\n\x1b[33m[console: ${ev.reason || "disconnected"}; reconnecting]\x1b[0m\r\n`);
      setTimeout(connect, 2000);
    };
  };
  term.onData((d) => { if (ws && ws.readyState === 1) ws.send(encoder.encode(d)); });
  connect();
  return () => { closed = true; if (ws) ws.close(); term.dispose(); };
}

async function openDisplay(box, name) {
  const { default: RFB } = await import("./vendor/novnc/core/rfb.js");
  const rfb = new RFB(box, wsUrl(`/ws/vnc/${encodeURIComponent(name)}`), {wsProtocols: ["binary"]});
  rfb.scaleViewport = true;
  window.kvmrunDisplay = rfb;
  return () => rfb.disconnect();
}

function statusGrid(s) {
  const rows = [["state", s.state], ["pid", s.pid ?? "-"], ["uptime", duration(s.uptime && Math.floor(s.uptime))],
    ["arch", `${s.arch ?? "-"}  machine ${s.machine ?? "-"}  accel ${s.accel ?? "-"}`],
    ["vcpus", s.vcpus ?? "-"], ["memory", mib(s.memory_mib)]];
  for (const d of s.disks || []) rows.push(["disk", `${d.device}: ${d.file} (${d.format}${d.readonly ? ", ro" : ""})`]);
  for (const f of s.forwards || []) rows.push(["forward", f]);
  for (const n of s.nics || []) rows.push(["nic", `net${n.index}: ${n.mac} (${n.type})`]);
  if (s.cpu_percent != null) rows.push(["host", `cpu ${s.cpu_percent}%  rss ${s.rss_mib} MiB`]);
  rows.push(["shutdown", s.shutdown_method ?? "-"], ["log", s.serial_log]);
  if (s.ended) rows.push(["ended", s.ended.detail || s.ended.reason]);
  return h("div", {class: "grid", id: "status"}, rows.flatMap(([k, v]) => [h("div", {}, k), h("div", {}, String(v))]));
}

export function guestPage(main, name, currentGuests) {
  const enc = encodeURIComponent(name);
  const statusBox = h("div"), buttons = h("div", {class: "row", id: "actions"});
  const term = h("div", {id: "terminal"}), display = h("div", {id: "display"});
  const shot = h("div"), log = h("pre", {id: "log"}), prof = h("pre", {id: "profile"}),
        argv = h("pre", {id: "cmdline"});
  const displaySection = h("section", {hidden: true}, h("h2", {}, "Display"),
    h("div", {class: "row"}, h("button", {id: "screenshot", onclick: screenshot}, "Screenshot (QMP screendump)")),
    display, shot);
  const snaps = h("tbody"), snapName = h("input", {id: "snap-name", placeholder: "snapshot name (optional)"});
  const snapshotSection = h("section", {}, h("h2", {}, "Snapshots"),
    h("table", {id: "snapshots"}, h("thead", {}, h("tr", {}, ["Name", "Date", "VM state", "Disks", ""].map((t) => h("th", {}, t)))), snaps),
    h("div", {class: "row"}, snapName, h("button", {id: "snap-create", onclick: () => snapshot("create", snapName.value)}, "Take snapshot")));
  main.replaceChildren(h("h1", {}, name), buttons, statusBox,
    h("h2", {}, "Console"), term, displaySection, snapshotSection,
    h("h2", {}, "Log (serial.log)"), log, h("h2", {}, "Profile"), prof, h("h2", {}, "QEMU command line"), argv);
  const closers = [];
  let running = null, stopped = false;

  async function screenshot() {
    const resp = await fetch(`/api/guests/${enc}/screenshot`, {method: "POST", credentials: "same-origin"});
    if (!resp.ok) { attempt(async () => { throw new Error((await resp.json()).error); }); return; }
    const url = URL.createObjectURL(await resp.blob());
    shot.replaceChildren(h("p", {}, h("img", {src: url, id: "screendump", alt: "screendump"})));
  }
  function showSnapshots(rows) {
    snaps.replaceChildren(...(rows || []).map((r) => h("tr", {"data-snap": r.name},
      h("td", {}, r.name), h("td", {}, r.date ? new Date(r.date * 1000).toLocaleString() : "-"),
      h("td", {class: "num"}, r.vm_state_size ? mib(Math.round(r.vm_state_size / 2 ** 20)) : "-"),
      h("td", {}, r.disks.map((d) => d.split("/").pop()).join(", ")),
      h("td", {}, h("button", {"data-snap-action": "revert", onclick: () => snapshot("revert", r.name)}, "Revert"),
        h("button", {"data-snap-action": "delete", onclick: () => snapshot("delete", r.name)}, "Delete")))));
    if (rows && !rows.length) snaps.append(h("tr", {}, h("td", {colspan: 5, class: "muted"}, "No snapshots.")));
  }
  async function snapshot(action, snap) {
    if (action !== "create" && !confirm(`${action} snapshot ${snap}?`)) return;
    const rows = await attempt(() => api(`/api/guests/${enc}/snapshots`, {action, snap}));
    if (rows) { showSnapshots(rows); snapName.value = ""; }
  }
  async function refresh() {
    const row = currentGuests().find((g) => g.name === name);
    // a defined VM that never ran has no run directory: show what is known without an error
    const s = await api(`/api/guests/${enc}`).catch((e) =>
      row ? {...row, pid: null} : (attempt(() => { throw e; }), null));
    if (stopped || !s) return;
    statusBox.replaceChildren(statusGrid(s));
    const busy = row?.busy;
    buttons.replaceChildren(...actionButtons({...s, busy}), busy ? h("span", {class: "busy"}, busy) : "");
    const nowRunning = Boolean(s.pid);
    if (nowRunning !== running) {
      running = nowRunning;
      api(`/api/guests/${enc}/snapshots`).then(showSnapshots, (e) =>
        snaps.replaceChildren(h("tr", {}, h("td", {colspan: 5, class: "muted"}, e.message))));
      const l = await attempt(() => api(`/api/guests/${enc}/log`));
      log.textContent = l ?? "";
      log.scrollTop = log.scrollHeight;
      const p = await attempt(() => api(`/api/guests/${enc}/profile`));
      if (p) {
        prof.textContent = p.yaml ?? "(not a defined VM)";
        argv.textContent = p.argv ? p.argv.map((a) => /[\s'"]/.test(a) ? `'${a}'` : a).join(" ") : "-";
        const vnc = (p.argv || []).includes("-vnc");
        displaySection.hidden = !vnc;
        if (vnc && running && !closers.display) closers.display = await openDisplay(display, name);
      }
    }
  }
  openConsole(term, name).then((close) => { if (stopped) close(); else closers.push(close); });
  refresh();
  const onGuests = () => refresh();
  document.addEventListener("guests", onGuests);
  return () => {
    stopped = true;
    document.removeEventListener("guests", onGuests);
    for (const c of closers) c();
    if (closers.display) closers.display();
  };
}
