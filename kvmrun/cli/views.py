"""What `status` and `list` print (no typer: kvmrun.cli.quick serves their plain forms
before typer is imported, kvmrun.cli.inspect the rest, and both print through here)."""

from __future__ import annotations

import json
import time


def json_text(value) -> str:
    """Every `--json` output: indented, keys in the order the operation built them."""
    return json.dumps(value, indent=2, sort_keys=False)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m
            else f"{s}s")


def ended_text(ended: dict | None) -> str:
    if not ended:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended["at"])) if ended.get(
        "at") else "unknown time"
    return f"{ended.get('detail', ended.get('reason'))} (at {when})"


def status_lines(info: dict) -> list[str]:
    """`kvmrun status NAME`: the guest's name, then one `key value` line each."""
    why = [("why", info["paused_reason"])] if info.get("paused_reason") else []
    moving = info.get("migration")
    rows = [("state", f"{info['state']}, migrating to {moving['to']} ({moving['status']})"
             if moving else info["state"]), *why, ("pid", info["pid"] or "-")]
    if info.get("problem"):
        rows.append(("problem", info["problem"]))
    if info.get("monitor"):
        rows.append(("monitor", info["monitor"]))
    if info.get("supervisor") == "dead":
        rows.append(("warning", "its supervisor is dead: events and the end are not "
                                "recorded (stop or kill it with kvmrun, then start it again)"))
    rows += [
            ("uptime", duration(info["uptime"])),
            ("arch", f"{info['arch']}  machine {info['machine']}  accel {info['accel']}"),
            ("vcpus", info["vcpus"]), ("memory", f"{info['memory_mib']} MiB")]
    for disk in info.get("disks", []):
        rows.append(("disk", f"{disk['device']}: {disk['file']} ({disk['format']}"
                             f"{', ro' if disk['readonly'] else ''})"))
    for fwd in info["forwards"]:
        rows.append(("forward", fwd))
    for nic in info.get("nics", []):
        where = {"user": "user network", "bridge": f"bridge {nic.get('bridge')}"}.get(
            nic["type"], f"{nic['type']} network {nic.get('network')}")
        lease = nic.get("lease")
        rows.append(("nic", f"net{nic['index']}: {nic['mac']} on {where}"
                            + (f" (tap {nic['tap']})" if nic.get("tap") else "")
                            + (f", lease {lease['ip']}" if lease else "")))
    for i in info.get("ephemeral_disks", []):
        rows.append(("overlay", f"disk{i} is ephemeral: its writes go to a throwaway overlay"))
    for share in info.get("shares", []):
        rows.append(("share", f"{share['path']} as {share['tag']} ({share['type']}"
                              f"{', ro' if share['readonly'] else ''}); in the guest: "
                              f"{share['mount']}"))
    if info.get("tpm"):
        rows.append(("tpm", f"TPM {info['tpm']['version']} (swtpm), state in "
                            f"{info['tpm']['state_dir']}"))
    if "cpu_percent" in info:
        rows.append(("host", f"cpu {info['cpu_percent']}% (average since start)  "
                             f"rss {info['rss_mib']} MiB"))
    if info.get("firmware"):
        rows.append(("firmware", info["firmware"] + (", Secure Boot on"
                                                     if info.get("secure_boot") else "")))
    rows.append(("shutdown", info["shutdown_method"]))
    if info.get("sandbox"):
        rows.append(("sandbox", info["sandbox"]))
    if info.get("qemu_user"):
        why = info.get("qemu_user_why")
        rows.append(("runs as", info["qemu_user"] + (f" (warning: QEMU keeps root: {why})"
                                                     if why else "")))
    if info.get("limits"):
        rows.append(("limits", limits_text(info["limits"])
                     + (f" (cgroup {info['cgroup']})" if info.get("cgroup") else "")))
    if info["pid"]:                         # sockets exist only while the guest runs
        rows += [("console", info["console"]), ("qmp", info["qmp"])]
        if info.get("agent"):
            rows.append(("agent", info["agent"]))
    rows.append(("log", info["serial_log"]))
    if info["ended"]:
        rows.append(("ended", ended_text(info["ended"])))
    return [info["name"]] + [f"  {key:<9}{value}" for key, value in rows]




def limits_text(limits: dict) -> str:
    """{'cpu_max': 150, 'memory_max': 2048} -> 'cpu_max 150%, memory_max 2048M'."""
    unit = {"cpu_max": "%", "memory_max": "M"}
    return ", ".join(f"{k} {v}{unit.get(k, '')}" for k, v in limits.items())


def list_lines(rows: list[dict], hosts: bool = False) -> list[str]:
    """The `list` table; with `hosts`, a HOST column first (`list -H a -H b`)."""
    units = any(r.get("unit") for r in rows)
    width = max([4] + [len(r.get("host") or "") for r in rows]) + 1 if hosts else 0
    host = (lambda r: f"{r.get('host') or '-':<{width}}") if hosts else (lambda r: "")
    lines = [(f"{'HOST':<{width}}" if hosts else "")
             + f"{'NAME':<20} {'STATE':<14} {'PID':>7} {'MEMORY':>8} {'VCPUS':>5}  {'UPTIME':<8}"
             + ("  UNIT" if units else "")]
    for r in rows:
        lines.append(host(r) + f"{r['name']:<20} {r['state']:<14} {r['pid'] or '-':>7} "
                     f"{str(r['memory_mib'] or '-') + 'M':>8} {r['vcpus'] or '-':>5}  "
                     f"{duration(r['uptime']):<8}" + (f"  {r.get('unit') or '-'}" if units
                                                     else ""))
    return lines
