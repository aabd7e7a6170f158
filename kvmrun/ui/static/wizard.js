// New VM, in virt-manager's order: name, installation source, operating system (searched in
// osinfo-db, RAM/CPUs/disk pre-filled from it), memory and CPUs, storage, network; then the
// profile and QEMU command line the server made (`kvmrun new`'s new_profile), editable,
// validated and defined (and started if asked).
import { api, attempt, h, mib } from "./util.js";

const field = (label, input) => h("label", {}, h("span", {}, label), input);

export function newPage(main) {
  const f = {
    name: h("input", {name: "name", required: true, placeholder: "web1"}),
    mode: h("select", {name: "mode"}, ["cdrom", "kernel", "import", "pxe", "none"].map((m) =>
      h("option", {value: m}, {cdrom: "ISO image (CD-ROM)", kernel: "Kernel + initrd",
        import: "Existing disk image", pxe: "Network boot (PXE)", none: "Nothing (blank VM)"}[m]))),
    cdrom: h("input", {name: "cdrom", placeholder: "/path/to/install.iso"}),
    kernel: h("input", {name: "kernel", placeholder: "/path/to/vmlinuz"}),
    initrd: h("input", {name: "initrd", placeholder: "/path/to/initrd.img"}),
    append: h("input", {name: "append", placeholder: "console=ttyS0"}),
    import_disk: h("input", {name: "import_disk", placeholder: "/path/to/disk.qcow2"}),
    os_search: h("input", {name: "os_search", placeholder: "search: debian, windows 11…"}),
    os_id: h("select", {name: "os_id"}, h("option", {value: ""}, "generic (no preset)")),
    memory: h("input", {name: "memory", placeholder: "1G"}),
    cpus: h("input", {name: "cpus", type: "number", min: 1, placeholder: "1"}),
    disk: h("input", {name: "disk", placeholder: "20G, a path, or none"}),
    pool: h("input", {name: "pool", placeholder: "(optional) storage pool"}),
    network: h("input", {name: "network", placeholder: "user, none, isolated:NAME, nat, bridge:BR"}),
    uefi: h("input", {name: "uefi", type: "checkbox"}),
    start: h("input", {name: "start", type: "checkbox"}),
  };
  const sources = {cdrom: [f.cdrom], kernel: [f.kernel, f.initrd, f.append], import: [f.import_disk]};
  const rows = {};
  const form = h("form", {class: "wizard", id: "new-vm", onsubmit: (e) => { e.preventDefault(); preview(); }},
    field("Name", f.name), field("Install from", f.mode),
    ...Object.entries({cdrom: "ISO image", kernel: "Kernel", initrd: "Initrd", append: "Kernel command line",
                        import_disk: "Disk image"}).map(([k, label]) => (rows[k] = field(label, f[k]))),
    field("Operating system", h("div", {class: "row"}, f.os_search, f.os_id)),
    field("Memory", f.memory), field("vCPUs", f.cpus), field("Disk", f.disk), field("Pool", f.pool),
    field("Network", f.network), field("UEFI firmware", f.uefi),
    h("div", {class: "row"}, h("button", {class: "primary", type: "submit", id: "preview"}, "Next: review")));
  const yaml = h("textarea", {id: "yaml", spellcheck: "false"});
  const argv = h("pre", {id: "new-cmdline"});
  const result = h("div", {id: "new-result"});
  const review = h("section", {hidden: true}, h("h2", {}, "Profile (edit if you like)"), yaml,
    h("h2", {}, "QEMU command line"), argv,
    h("div", {class: "row"}, h("button", {id: "validate", type: "button", onclick: validate}, "Validate"),
      h("label", {}, f.start, " start after defining"),
      h("button", {class: "primary", id: "define", type: "button", onclick: define}, "Define")), result);
  main.replaceChildren(h("h1", {}, "New VM"), form, review);

  const showSources = () => {
    for (const [m, inputs] of Object.entries(sources))
      for (const i of inputs) rows[i.name].hidden = f.mode.value !== m;
  };
  f.mode.addEventListener("change", showSources);
  showSources();
  let found = [];
  const search = async () => {
    found = (await attempt(() => api(`/api/os?q=${encodeURIComponent(f.os_search.value)}`))) || [];
    f.os_id.replaceChildren(h("option", {value: ""}, "generic (no preset)"),
      ...found.map((o) => h("option", {value: o.id}, `${o.name} (${o.id})`)));
    if (found.length && f.os_search.value) { f.os_id.value = found[0].id; prefill(); }
  };
  const prefill = () => {
    const o = found.find((x) => x.id === f.os_id.value);
    if (!o) return;
    f.memory.placeholder = mib(o.suggested.memory_mib);
    f.cpus.placeholder = o.suggested.cpus;
    f.disk.placeholder = `${o.suggested.disk_gib}G`;
    f.uefi.checked = o.firmware === "uefi";
  };
  let timer;
  f.os_search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 200); });
  f.os_id.addEventListener("change", prefill);

  const formData = () => Object.fromEntries(Object.entries(f).map(([k, el]) =>
    [k, el.type === "checkbox" ? el.checked : el.value.trim()]));
  async function preview() {
    const r = await attempt(() => api("/api/new/preview", formData()));
    if (!r) return;
    yaml.value = r.yaml;
    argv.textContent = r.argv.join(" ");
    review.hidden = false;
    result.replaceChildren();
  }
  async function validate() {
    const r = await attempt(() => api("/api/new/validate", {yaml: yaml.value}));
    if (r) { argv.textContent = r.argv.join(" "); result.replaceChildren(h("div", {class: "notice", id: "valid"}, "The profile is valid.")); }
  }
  async function define() {
    const r = await attempt(() => api("/api/new/define", {yaml: yaml.value, start: f.start.checked}));
    if (!r) return;
    result.replaceChildren(h("div", {class: "notice", id: "defined"},
      `${r.outcome} ${r.name} (${r.path})${r.started ? ", started" : ""}. `,
      h("a", {href: `#/guest/${encodeURIComponent(r.name)}`}, "Open it")),
      ...r.warnings.map((w) => h("div", {class: "muted"}, `warning: ${w}`)));
  }
  search();
}
