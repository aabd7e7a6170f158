"""Host verbs: doctor."""

from __future__ import annotations

import typer

from kvmrun.cli.app import app, emit_json, out
from kvmrun.ops.doctor import findings


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json"),
    probe: bool = typer.Option(True, "--probe/--no-probe",
                               help="Boot-probe a kernel under KVM (verdict cached per boot)."),
    reprobe: bool = typer.Option(False, "--reprobe", help="Ignore the cached KVM verdict."),
) -> None:
    """Check this host: QEMU binaries, /dev/kvm (and whether guests really boot under it),
    firmware, qemu-img, the helper daemons (virtiofsd, swtpm), directories, socket path
    headroom. Exit 3 if something is broken."""
    results = findings(probe=probe, force_probe=reprobe)
    if as_json:
        emit_json(results)
    else:
        mark = {True: "ok  ", False: "FAIL", None: "note"}
        for f in results:
            out(f"{mark[f['ok']]}  {f['check']:<30} {f['detail']}")
            if f["hint"] and f["ok"] is not True:
                out(f"      {'':<30} fix: {f['hint']}")
    if any(f["ok"] is False and f["check"] != "kvm boot probe" for f in results):
        raise typer.Exit(3)
