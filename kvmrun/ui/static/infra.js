// Networks (`kvmrun net`) and storage pools (`kvmrun pool`, `kvmrun disk`).
import { api, attempt, h } from "./util.js";

const gib = (n) => n == null ? "-" : `${(n / 2 ** 30).toFixed(1)} GiB`;

export function networksPage(main) {
  const body = h("tbody");
  const name = h("input", {placeholder: "lab1"}), type = h("select", {},
    h("option", {value: "isolated"}, "isolated (guests only)"), h("option", {value: "nat"}, "nat (root)"));
  const subnet = h("input", {placeholder: "subnet (optional)"});
  const load = async () => {
    const nets = (await attempt(() => api("/api/networks"))) || [];
    body.replaceChildren(...nets.map((n) => h("tr", {"data-name": n.name},
      h("td", {}, n.name), h("td", {}, n.type), h("td", {}, n.subnet || "-"),
      h("td", {}, n.running ? "running" : "stopped"), h("td", {class: "num"}, n.nics),
      h("td", {}, ["start", "stop"].map((a) => h("button", {disabled: a === "start" ? n.running : !n.running,
        onclick: async () => { await attempt(() => api(`/api/networks/${encodeURIComponent(n.name)}/${a}`, {})); load(); }},
        a === "start" ? "Start" : "Stop"))))));
    if (!nets.length) body.append(h("tr", {}, h("td", {colspan: 6, class: "muted"}, "No networks defined.")));
  };
  main.replaceChildren(h("h1", {}, "Networks"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Type", "Subnet", "State", "NICs", ""].map((t) => h("th", {}, t)))), body),
    h("h2", {}, "Define a network"), h("div", {class: "row"}, name, type, subnet,
      h("button", {onclick: async () => { await attempt(() => api("/api/networks", {name: name.value, type: type.value, subnet: subnet.value})); load(); }}, "Define")));
  load();
  const timer = setInterval(load, 3000);
  return () => clearInterval(timer);
}

export function storagePage(main) {
  const list = h("div");
  const name = h("input", {placeholder: "images"}), path = h("input", {placeholder: "/var/lib/kvmrun/images"});
  const load = async () => {
    const pools = (await attempt(() => api("/api/pools"))) || [];
    list.replaceChildren(...pools.map((p) => h("section", {"data-pool": p.name},
      h("h2", {}, `${p.name} (${p.type}) ${p.path || p.vg || ""} — ${gib(p.free)} free of ${gib(p.capacity)}`),
      h("table", {}, h("thead", {}, h("tr", {}, ["Volume", "Format", "Size", "Allocated", "Used by"].map((t) => h("th", {}, t)))),
        h("tbody", {}, p.volumes.length ? p.volumes.map((v) => h("tr", {},
          h("td", {}, v.name), h("td", {}, v.format || "-"), h("td", {class: "num"}, gib(v.virtual_size ?? v.size)),
          h("td", {class: "num"}, gib(v.actual_size)), h("td", {}, v.in_use_by || "-")))
          : h("tr", {}, h("td", {colspan: 5, class: "muted"}, "No volumes.")))))));
    if (!pools.length) list.append(h("p", {class: "muted"}, "No storage pools defined."));
  };
  main.replaceChildren(h("h1", {}, "Storage"), list, h("h2", {}, "Define a directory pool"),
    h("div", {class: "row"}, name, path,
      h("button", {onclick: async () => { await attempt(() => api("/api/pools", {name: name.value, path: path.value})); load(); }}, "Define")));
  load();
  const timer = setInterval(load, 5000);
  return () => clearInterval(timer);
}
