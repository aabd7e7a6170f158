"""The face: the typer CLI. `app` holds the shared app and options, one module per group of
verbs, `entry` the entry point (the `kvmrun` console script is kvmrun.cli.entry:main)."""

from kvmrun.cli.entry import main

__all__ = ["main"]
