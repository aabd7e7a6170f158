"""`kvmrun net …`: named networks (isolated: guests only, no root; nat: a bridge with DHCP,
DNS and masquerading, root). Thin: each verb calls kvmrun.net / kvmrun.ops.networks."""

from __future__ import annotations

from typing import Optional

import typer

from kvmrun.cli.app import app, emit_json, out
from kvmrun.net import defs, nat
from kvmrun.ops import networks

net_app = typer.Typer(help="Named networks: define, start, stop, list, status.",
                      no_args_is_help=True)
app.add_typer(net_app, name="net")

NetName = typer.Argument(..., metavar="NAME", help="The network's name.")


@net_app.command("define")
def define(
    name: str = NetName,
    type_: str = typer.Option("isolated", "--type", metavar="isolated|nat",
                              help="isolated: guests only, no root; nat: bridge + DHCP/DNS + "
                                   "masquerade (root)."),
    subnet: Optional[str] = typer.Option(None, "--subnet", metavar="CIDR",
                                         help="Address range, e.g. 192.168.150.0/24 (nat: "
                                              "default a free 192.168.150-249.0/24; "
                                              "isolated: informational)."),
) -> None:
    """Define a named network in the config directory (profiles use it by name)."""
    data = defs.define(name, type_, subnet)
    out(f"defined {data['type']} network {name}"
        + (f" ({data['subnet']})" if data.get("subnet") else ""))


@net_app.command("undefine")
def undefine(name: str = NetName) -> None:
    """Remove a network definition (a NAT network must be stopped first)."""
    networks.undefine(name)
    out(f"undefined network {name}")


@net_app.command("start")
def start(name: str = NetName) -> None:
    """Bring up a NAT network (defined with defaults on first use). Root only."""
    state = nat.nat_start(name)
    out(f"started NAT network {name}: bridge {state['bridge']}, gateway {state['gateway']}, "
        f"DHCP {state['range'][0]}-{state['range'][1]}")


@net_app.command("stop")
def stop(name: str = NetName,
         force: bool = typer.Option(False, "--force",
                                    help="Stop even with guest NICs attached.")) -> None:
    """Take a NAT network down (dnsmasq, its nftables table and its bridge go), or stop an
    isolated network's hub."""
    kind = networks.stop(name, force)
    out(f"stopped {'NAT' if kind == 'nat' else kind} network {name}")


@net_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json")) -> None:
    """Defined networks: type, subnet, whether running, attached NICs."""
    rows = networks.list_networks()
    if as_json:
        emit_json(rows)
        return
    out(f"{'NAME':<20} {'TYPE':<9} {'SUBNET':<18} {'STATE':<8} NICS")
    for r in rows:
        out(f"{r['name']:<20} {r['type']:<9} {r['subnet'] or '-':<18} "
            f"{'running' if r['running'] else 'stopped':<8} {r['nics']}")


@net_app.command("status")
def status(name: str = NetName, as_json: bool = typer.Option(False, "--json")) -> None:
    """A network's state; for NAT networks the bridge, dnsmasq and the DHCP leases."""
    info = networks.status(name)
    if as_json:
        emit_json(info)
        return
    out(name)
    out(f"  type     {info['type']}")
    out(f"  state    {'running' if info['running'] else 'stopped'}")
    if info.get("subnet"):
        out(f"  subnet   {info['subnet']}")
    if info["type"] == "nat":
        out(f"  bridge   {info.get('bridge')}  gateway {info.get('gateway') or '-'}")
        if info.get("running"):
            out(f"  dnsmasq  pid {info.get('dnsmasq_pid')}  nftables table ip {info['table']}")
        for tap in info.get("taps", []):
            out(f"  tap      {tap}")
        for lease in info.get("leases", []):
            out(f"  lease    {lease['ip']}  {lease['mac']}  {lease['hostname'] or '-'}")
    else:
        out(f"  hub      {'pid ' + str(info['hub_pid']) if info.get('hub_pid') else '-'}")
        for member in info.get("members", []):
            out(f"  member   {member}")
