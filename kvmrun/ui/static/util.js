// Small helpers shared by the pages: the API (same-origin fetch; the token is a cookie),
// the error banner, and an element builder.

export async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const resp = await fetch(path, {...init, credentials: "same-origin"});
  const text = await resp.text();
  let data;
  try { data = JSON.parse(text); } catch { data = {error: `HTTP ${resp.status}: ${text.trim()}`}; }
  if (!resp.ok || data.error) { throw new Error(data.error || `HTTP ${resp.status}`); }
  return data.result;
}

export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message ? `kvmrun: error: ${message}` : "";
  box.hidden = !message;
}

export async function attempt(fn) {
  try { showError(""); return await fn(); } catch (e) { showError(e.message); return undefined; }
}

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false && v != null) el.setAttribute(k, v);
  }
  // Element.prototype: a form's own `append` may be its input named "append"
  for (const c of children.flat())
    Element.prototype.append.call(el, c instanceof Node ? c : document.createTextNode(c ?? ""));
  return el;
}

export function duration(s) {
  if (s == null) return "-";
  const d = Math.floor(s / 86400), hr = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d}d${hr}h` : hr ? `${hr}h${String(m).padStart(2, "0")}m`
       : m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

export function mib(n) { return n == null ? "-" : n % 1024 === 0 ? `${n / 1024}G` : `${n}M`; }
