"""The face: the typer CLI. `app` holds the shared app and options, one module per group of
verbs, `entry` the full entry point, `quick` the console script (`kvmrun`), which serves a
plain `start PROFILE`, `stop NAME`, `status NAME` and `list` before typer is imported and
hands everything else to `entry`. Nothing is imported here, so the quick path stays light."""


def __getattr__(name: str):
    if name == "main":                       # `from kvmrun.cli import main` (tests, scripts)
        from kvmrun.cli.entry import main
        return main
    raise AttributeError(f"module 'kvmrun.cli' has no attribute {name!r}")
