"""The verb table of kvmrun.cli.entry matches what the verb modules register, so `kvmrun
VERB` always imports the module that has VERB (and only that one)."""

from __future__ import annotations

import json
import subprocess
import sys

import typer

from kvmrun.cli import entry

PROBE = """
import importlib, json
from kvmrun.cli import entry
from kvmrun.cli.app import app
seen = {}
for module in entry.MODULES:
    commands, groups = len(app.registered_commands), len(app.registered_groups)
    importlib.import_module("kvmrun.cli." + module)
    for c in app.registered_commands[commands:]:
        seen.setdefault(entry._name(c), []).append(module)
    for g in app.registered_groups[groups:]:
        seen.setdefault(g.name, []).append(module)
print(json.dumps(seen))
"""


def test_every_verb_is_in_the_table_with_its_module():
    """In a fresh interpreter: each module, imported in turn, registers exactly the verbs
    the table gives it, and no verb is registered twice."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    registered = json.loads(out)
    assert {verb: modules for verb, modules in registered.items() if len(modules) > 1} == {}
    assert {verb: modules[0] for verb, modules in registered.items()} == entry.VERBS


def test_one_verb_builds_one_command():
    command = entry.build_command(["--debug", "status", "web1"])
    assert isinstance(command, typer.core.TyperGroup)
    assert list(command.commands) == ["status"]
    everything = entry.build_command(["--help"])
    assert set(everything.commands) == set(entry.VERBS)
