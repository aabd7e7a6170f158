"""The typer app and what every verb module shares: output, the common options, the guest
NAME argument. Verb modules import from here; kvmrun.cli.main imports the verb modules (never
the other way round).

Exit codes (kvmrun.errors): 0 ok · 1 error · 2 bad profile or usage · 3 host problem · 4 guest
not in the needed state · 5 timed out · 6 QMP error · 7 QEMU failed to start · 130
interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Optional

import typer

from kvmrun.cli.views import json_text
from kvmrun.errors import UsageError
from kvmrun.guest.rundir import Guest
from kvmrun.paths import check_name

def lazy(name: str) -> ModuleType:
    """`name`, imported when first used. Verb modules import backends this way where only
    some of their verbs need them: `kvmrun --help` imports every verb module, and must not
    load the profile model, yaml and the compiler for that (the lazy-import test pins it)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


SETTINGS = dict(
    name="kvmrun",
    help="Run KVM/QEMU virtual machines from YAML profiles, without libvirt.\n\n"
         "A PROFILE is a .yaml file or the name of a defined VM (`kvmrun define`).\n\n"
         "Environment: KVMRUN_RUN_DIR, KVMRUN_CONFIG_DIR, KVMRUN_DATA_DIR, KVMRUN_CACHE_DIR "
         "move kvmrun's directories (KVMRUN_SYSTEMD_DIR: where `kvmrun systemd` writes units); "
         "KVMRUN_ACCEL=kvm|tcg forces the accelerator; "
         "KVMRUN_DEBUG=1 is --debug; KVMRUN_HOST is --host, KVMRUN_SSH the ssh command "
         "(default ssh), KVMRUN_REMOTE_COMMAND the kvmrun there (default kvmrun).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app = typer.Typer(**SETTINGS)

SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE",
                      help="Override a profile key, e.g. --set memory=4G --set "
                           "disks.0.cache=unsafe (repeatable).")
NameArg = typer.Argument(..., metavar="NAME", help="The guest's name.")


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", envvar="KVMRUN_DEBUG",
                               help="Show tracebacks, and the exact command lines kvmrun runs "
                                    "(QEMU's among them) on stderr."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", metavar="DIR",
                                          help="Run directory (default: $KVMRUN_RUN_DIR, "
                                               "/run/kvmrun for root, "
                                               "$XDG_RUNTIME_DIR/kvmrun otherwise)."),
    host: Optional[list[str]] = typer.Option(
        None, "-H", "--host", metavar="[USER@]HOST[:PORT]",
        help="Run the verb on HOST through ssh (its ~/.ssh/config aliases, keys and "
             "ProxyJump apply; $KVMRUN_SSH is the ssh command, $KVMRUN_REMOTE_COMMAND the "
             "kvmrun there). Exit code, --json and messages come back unchanged; ssh's own "
             "failures exit 3. Anywhere on the line; `list` takes it more than once. "
             "Default: $KVMRUN_HOST."),
) -> None:
    if debug:
        os.environ["KVMRUN_DEBUG"] = "1"     # kvmrun.proc logs every argv it runs
    if run_dir:
        os.environ["KVMRUN_RUN_DIR"] = os.path.abspath(run_dir)


def out(text: str = "") -> None:
    """All normal output goes through here."""
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")


def emit_json(value) -> None:
    out(json_text(value))


def json_object(text: str | None) -> dict | None:
    """A JSON-ARGS argument (`kvmrun qmp`, `kvmrun agent`): a JSON object, or nothing."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UsageError(f"JSON-ARGS is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise UsageError("JSON-ARGS must be a JSON object, e.g. '{\"pid\": 812}'")
    return value


def guest(name: str) -> Guest:
    """The guest a NAME argument names (validated: the name becomes a path)."""
    return Guest(check_name(name))


def oneoff_options() -> dict:
    """The one-off flags shared by cmdline, start and run (kvmrun.ops.profiles)."""
    return dict(
        name=typer.Option(None, "--name", help="VM name."),
        hda=typer.Option(None, "--hda", metavar="IMAGE", help="First hard disk (IDE)."),
        disk=typer.Option(None, "--disk", metavar="IMAGE", help="A virtio disk (repeatable)."),
        cdrom=typer.Option(None, "--cdrom", metavar="ISO", help="CD-ROM image."),
        boot=typer.Option(None, "--boot", metavar="ORDER", help="Boot order: c, d, n, e.g. dc."),
        memory=typer.Option(None, "-m", "--memory", metavar="SIZE", help="RAM: 2048, 512M, 2G."),
        smp=typer.Option(None, "--smp", metavar="N", help="vCPUs."),
        arch=typer.Option(None, "--arch", help="Guest architecture."),
        machine=typer.Option(None, "--machine", help="QEMU machine type."),
        accel=typer.Option(None, "--accel", help="auto, kvm or tcg."),
        cpu=typer.Option(None, "--cpu", help="CPU model."),
        kernel=typer.Option(None, "--kernel", metavar="FILE", help="Direct kernel boot."),
        initrd=typer.Option(None, "--initrd", metavar="FILE", help="Initial ramdisk."),
        append=typer.Option(None, "--append", metavar="CMDLINE", help="Kernel command line."),
        gdb=typer.Option(None, "--gdb", metavar="[PORT]",
                         help="gdb stub on a private unix socket (gdb.sock in the run "
                              "directory), or on TCP PORT / HOST:PORT (any local user "
                              "can reach TCP)."),
        halted=typer.Option(False, "--halted",
                            help="Start with vCPUs stopped (`kvmrun resume` or gdb's "
                                 "`continue` starts them)."),
    )


ONEOFF = oneoff_options()
