// kvmrun ui: a hash-routed single page. Every action is one POST to the server, which makes
// the same library call as the CLI verb of that name.
import { api, attempt, showError, h, duration, mib } from "./util.js";
import { actionButtons } from "./actions.js";
import { guestPage } from "./guest.js";
import { newPage } from "./wizard.js";
import { networksPage, storagePage } from "./infra.js";

const main = document.getElementById("main");
let guests = [];
let cleanup = () => {};

// ---------------------------------------------------------------- live guest list (SSE)
function connectEvents() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.addEventListener("guests", (ev) => {
    const data = JSON.parse(ev.data);
    if (data.error) { showError(data.error); return; }
    guests = data;
    document.dispatchEvent(new CustomEvent("guests", {detail: guests}));
  });
  source.onopen = () => { live.textContent = "live"; live.classList.remove("off"); };
  source.onerror = () => { live.textContent = "reconnecting…"; live.classList.add("off"); };
}

// ---------------------------------------------------------------- the Guests page
function guestsPage() {
  const body = h("tbody");
  const table = h("table", {id: "guests"},
    h("thead", {}, h("tr", {}, ["Name", "State", "Uptime", "vCPUs", "Memory", "Host CPU", "RSS", ""]
      .map((t) => h("th", {}, t)))), body);
  main.replaceChildren(h("h1", {}, "Guests"), table,
    h("p", {class: "muted"}, "Running guests and defined VMs; changes from the command line appear within a second."));
  const render = () => {
    body.replaceChildren(...guests.map((g) => h("tr", {"data-name": g.name, "data-state": g.state},
      h("td", {}, h("a", {href: `#/guest/${encodeURIComponent(g.name)}`}, g.name)),
      h("td", {}, h("span", {class: `state state-${g.state}`}, g.state),
        g.busy ? h("div", {class: "busy"}, g.busy) : ""),
      h("td", {class: "num"}, duration(g.uptime)), h("td", {class: "num"}, g.vcpus ?? "-"),
      h("td", {class: "num"}, mib(g.memory_mib)),
      h("td", {class: "num"}, g.cpu_percent != null ? `${g.cpu_percent}%` : "-"),
      h("td", {class: "num"}, g.rss_mib != null ? `${g.rss_mib} MiB` : "-"),
      h("td", {}, actionButtons(g)))));
    if (!guests.length) body.append(h("tr", {}, h("td", {colspan: 8, class: "muted"},
      "No guests yet: start one with `kvmrun start`, or make one under New VM.")));
    if (guests.length && window.kvmrunListShown === undefined)
      window.kvmrunListShown = performance.now();   // bench/ui.py: navigation -> first rows
  };
  render();
  document.addEventListener("guests", render);
  return () => document.removeEventListener("guests", render);
}

// ---------------------------------------------------------------- router
function route() {
  cleanup();
  showError("");
  const [, page, arg] = (location.hash || "#/").split("/");
  for (const a of document.querySelectorAll("nav a"))
    a.classList.toggle("active", a.dataset.page === (page || "guests"));
  const pages = {"": guestsPage, new: () => newPage(main), networks: () => networksPage(main),
                 storage: () => storagePage(main),
                 guest: () => guestPage(main, decodeURIComponent(arg || ""), () => guests)};
  cleanup = (pages[page] || guestsPage)() || (() => {});
}

window.addEventListener("hashchange", route);
connectEvents();
route();
