"""Verbs that look at guests: status, list. Light: no profile machinery (the lazy-import
test pins what they load)."""

from __future__ import annotations

import time

import typer

from kvmrun.cli.app import NameArg, app, emit_json, guest, out
from kvmrun.ops import inspect


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m
            else f"{s}s")


def _ended_text(ended: dict | None) -> str:
    if not ended:
        return "-"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended["at"])) if ended.get(
        "at") else "unknown time"
    return f"{ended.get('detail', ended.get('reason'))} (at {when})"


@app.command()
def status(name: str = NameArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """State, resources, disks, forwards and paths of a guest; for a stopped guest, how
    and when it ended."""
    info = inspect.status(guest(name))
    if as_json:
        emit_json(info)
        return
    why = [("why", info["paused_reason"])] if info.get("paused_reason") else []
    moving = info.get("migration")
    rows = [("state", f"{info['state']}, migrating to {moving['to']} ({moving['status']})"
             if moving else info["state"]), *why, ("pid", info["pid"] or "-")]
    if info.get("problem"):
        rows.append(("problem", info["problem"]))
    if info.get("supervisor") == "dead":
        rows.append(("warning", "its supervisor is dead: events and the end are not "
                                "recorded (stop or kill it with kvmrun, then start it again)"))
    rows += [
            ("uptime", _duration(info["uptime"])),
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
        rows.append(("ended", _ended_text(info["ended"])))
    out(f"{info['name']}")
    for key, value in rows:
        out(f"  {key:<9}{value}")


def limits_text(limits: dict) -> str:
    """{'cpu_max': 150, 'memory_max': 2048} -> 'cpu_max 150%, memory_max 2048M'."""
    unit = {"cpu_max": "%", "memory_max": "M"}
    return ", ".join(f"{k} {v}{unit.get(k, '')}" for k, v in limits.items())


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json"),
    all_: bool = typer.Option(False, "--all", help="Also defined VMs that are not running."),
    defined: bool = typer.Option(False, "--defined", help="Only defined VMs."),
) -> None:
    """One line per guest: state, PID, memory, vCPUs, uptime."""
    live = inspect.list_guests()
    rows = [] if defined else live
    if all_ or defined:
        from kvmrun.ops.defined import defined_rows     # yaml and the profile model
        known = {r["name"] for r in rows}
        rows += [r for r in defined_rows(live) if r["name"] not in known]
    if as_json:
        emit_json(rows)
        return
    render_list(rows)


def render_list(rows: list[dict], hosts: bool = False) -> None:
    """The `list` table; with `hosts`, a HOST column first (`list -H a -H b`)."""
    units = any(r.get("unit") for r in rows)
    width = max([4] + [len(r.get("host") or "") for r in rows]) + 1 if hosts else 0
    host = (lambda r: f"{r.get('host') or '-':<{width}}") if hosts else (lambda r: "")
    out((f"{'HOST':<{width}}" if hosts else "")
        + f"{'NAME':<20} {'STATE':<14} {'PID':>7} {'MEMORY':>8} {'VCPUS':>5}  {'UPTIME':<8}"
        + ("  UNIT" if units else ""))
    for r in rows:
        out(host(r) + f"{r['name']:<20} {r['state']:<14} {r['pid'] or '-':>7} "
            f"{str(r['memory_mib'] or '-') + 'M':>8} {r['vcpus'] or '-':>5}  "
            f"{_duration(r['uptime']):<8}" + (f"  {r.get('unit') or '-'}" if units else ""))
