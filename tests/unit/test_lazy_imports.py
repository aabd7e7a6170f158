"""The quick verbs import only what they use (no timings here: bench/run.py measures those).

Each verb's set of kvmrun modules, and of the heavy third-party ones (typer, click, rich,
pydantic, yaml, psutil), is pinned exactly: a new import on one of these paths fails here
until it is added on purpose. `status` and `list` run on the run directory and QMP alone (no
YAML, no profile model, no psutil); no verb pulls in pydantic through typer's parameter
coercion (kvmrun.cli.nopydantic); the quick start, a plain `stop NAME`, `status NAME
[--json]` and `list [--json]` import no typer at all. A typer upgrade
that brings pydantic back into every call fails here too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The console script's own entry (kvmrun.cli.quick) with an argv: it returns (or raises
# SystemExit) instead of ending the process, so the probe can list what was imported.
PROBE = """
import json, sys
from kvmrun.cli.quick import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = [n for n, m in sys.modules.items() if type(m).__name__ != "_LazyModule"]
sys.stdout.write("\\nMODULES " + json.dumps(sorted(loaded)) + "\\n")
"""
THIRD_PARTY = ("typer", "click", "rich", "pydantic", "yaml", "psutil", "aiohttp")


def imported_by(args, env: dict, timeout: float = 60) -> tuple[set[str], str]:
    """(modules imported by `kvmrun ARGS`, its stdout before the list)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    out, line = proc.stdout.rsplit("\nMODULES ", 1)
    return set(json.loads(line)), out


def ours(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "kvmrun" or m.startswith("kvmrun.")}


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in THIRD_PARTY and "." not in m}


def env_for(tmp_path) -> dict:
    return {"KVMRUN_RUN_DIR": str(tmp_path / "run"), "KVMRUN_CONFIG_DIR": str(tmp_path / "cfg"),
            "KVMRUN_CACHE_DIR": str(tmp_path / "cache"), "KVMRUN_DATA_DIR": str(tmp_path / "d"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def modules_after(tmp_path, *args) -> set[str]:
    return imported_by(args, env_for(tmp_path))[0]


HEAVY = {"pydantic", "yaml", "psutil", "kvmrun.profile", "kvmrun.qemu.compile",
         "kvmrun.ops.defined", "kvmrun.net.nics", "kvmrun.storage.disks",
         "aiohttp", "kvmrun.ui.server", "xml.etree.ElementTree"}   # aiohttp: `kvmrun ui` only

# What every typer verb needs: the entry, the shared app, the run directory, remote split.
CLI = {"kvmrun", "kvmrun.cli", "kvmrun.cli.quick", "kvmrun.cli.entry", "kvmrun.cli.app",
       "kvmrun.cli.nopydantic", "kvmrun.errors", "kvmrun.files", "kvmrun.paths",
       "kvmrun.proc", "kvmrun.guest", "kvmrun.guest.rundir", "kvmrun.guest.launch",
       "kvmrun.ops", "kvmrun.ops.remote", "kvmrun.cli.text",
       "kvmrun.cli.views",               # emit_json: every --json prints through it
       "kvmrun.records"}                 # ops.remote's Host (not dataclasses: inspect, ast)
LOOKING = {"kvmrun.ops.inspect", "kvmrun.guest.qmp", "kvmrun.cli.views",
           "kvmrun.guest.agent",                  # agent.has_port: status shows the socket
           "kvmrun.guest.netrecord", "kvmrun.net", "kvmrun.net.leases",
           "kvmrun.net.names",                    # the NICs' addresses from the leases
           "kvmrun.guest.cgroup"}                 # the limits' cgroup of a running guest
# (kvmrun.guest.exits, how QEMU ended, only for a guest whose supervisor died unseen)
INSPECT = CLI | LOOKING | {"kvmrun.cli.inspect"}
# `status NAME [--json]` and `list [--json]`, what scripts poll, are served before typer too.
QUICK_LOOK = {"kvmrun", "kvmrun.cli", "kvmrun.cli.quick", "kvmrun.cli.text", "kvmrun.errors",
              "kvmrun.files", "kvmrun.paths", "kvmrun.proc", "kvmrun.guest",
              "kvmrun.guest.rundir", "kvmrun.guest.launch", "kvmrun.ops"} | LOOKING
# What stopping a guest needs, and `kvmrun stop NAME` (no option) imports nothing more: it is
# served before typer (kvmrun.cli.quick). With an option it goes through typer's CLI.
# The end's record (kvmrun.guest.ending and its cgroup, helpers, spawn, netrecord) only
# when the CLI records it itself: the guest's supervisor is gone.
POWER = {"kvmrun.ops.power", "kvmrun.guest.qmp", "kvmrun.guest.shutdown",
         "kvmrun.ops.systemd", "kvmrun.guest.notify"}       # through kvmrun@NAME if enabled
QUICK_STOP = {"kvmrun", "kvmrun.cli", "kvmrun.cli.quick", "kvmrun.cli.text", "kvmrun.errors",
              "kvmrun.files", "kvmrun.paths", "kvmrun.proc", "kvmrun.guest",
              "kvmrun.guest.rundir", "kvmrun.guest.launch", "kvmrun.ops"} | POWER
STOP = CLI | POWER | {"kvmrun.cli.power"}
# The quick start, up to the fork of the supervisor (the supervisor's own imports happen in
# the child); no typer, no profile model, no compiler; the end's clean-up (ending) only
# when the start fails, the forwards' check (net.ports) only for a profile with forwards.
QUICK_START = {"kvmrun", "kvmrun.cli", "kvmrun.cli.quick", "kvmrun.errors", "kvmrun.files",
               "kvmrun.paths", "kvmrun.proc", "kvmrun.guest", "kvmrun.guest.rundir",
               "kvmrun.guest.launch", "kvmrun.guest.netrecord", "kvmrun.ops",
               "kvmrun.ops.quickstart", "kvmrun.qemu", "kvmrun.qemu.kvmprobe",
               "kvmrun.cli.text"}                                # its lines, its errors


@pytest.mark.parametrize("args, expected", [
    (["--debug", "list", "--json"], INSPECT), (["--debug", "list"], INSPECT),
    (["--debug", "status", "web1", "--json"], INSPECT), (["--debug", "status", "web1"], INSPECT),
    (["stop", "web1", "--json"], STOP), (["stop", "--force", "web1"], STOP)])
def test_each_quick_verb_imports_exactly_what_it_uses(tmp_path, args, expected):
    loaded = modules_after(tmp_path, *args)
    assert ours(loaded) == expected
    assert heavy(loaded) == {"typer"}             # typer 0.29 vendors click; no rich
    assert not HEAVY & loaded


@pytest.mark.parametrize("args", [["list", "--json"], ["list"], ["status", "web1", "--json"],
                                  ["status", "--json", "web1"], ["status", "web1"]])
def test_a_plain_status_or_list_imports_no_typer(tmp_path, args):
    loaded = modules_after(tmp_path, *args)
    assert ours(loaded) == QUICK_LOOK
    assert not heavy(loaded) and not HEAVY & loaded
    assert not {"subprocess", "threading", "typing"} & loaded


def test_a_plain_status_or_list_says_what_the_full_cli_says(tmp_path):
    """Served before typer, `status` and `list` print what the full CLI prints (`--debug`
    and kvmrun.cli.entry take the full CLI), word for word and exit code for exit code: no guest, a guest
    that does not exist, a bad name; tests/integration/test_lifecycle.py compares them on
    a real guest. Any other option, or another host, goes to the full CLI."""
    env = env_for(tmp_path)

    def run(*args, entry="kvmrun.cli.quick"):
        return subprocess.run([sys.executable, "-c", f"from {entry} import main; main()",
                               *args], env=env, capture_output=True, text=True, timeout=60)
    for args in (["list", "--json"], ["list"], ["status", "web1", "--json"],
                 ["status", "web1"], ["status", "no/such"]):
        quick, full = run(*args), run(*args, entry="kvmrun.cli.entry")
        assert (quick.returncode, quick.stdout, quick.stderr) == (
            full.returncode, full.stdout, full.stderr), args
    assert run("list", "--json").stdout == "[]\n"
    refused = run("status", "web1")
    assert refused.returncode != 0 and refused.stderr.startswith("kvmrun: error: ")
    for args in (["list", "--all"], ["status", "web1", "--json", "--json"]):
        assert "typer" in imported_by(args, env)[0], args
    remote = subprocess.run([sys.executable, "-c", PROBE, "list", "--json"],
                            env={**env, "KVMRUN_HOST": "nosuchhost.invalid",
                                 "KVMRUN_SSH": "false"},
                            capture_output=True, text=True, timeout=60)
    assert "typer" in remote.stdout.rsplit("\nMODULES ", 1)[1]   # another host: full CLI


def test_a_plain_stop_imports_no_typer_and_says_what_the_full_cli_says(tmp_path):
    """`kvmrun stop NAME` is served before typer; its refusal is the full CLI's, word for
    word and exit code for exit code (here: a guest that does not run, a bad name)."""
    env = env_for(tmp_path)
    loaded, _ = imported_by(["stop", "web1"], env)
    assert ours(loaded) == QUICK_STOP
    assert not heavy(loaded)
    assert not {"subprocess", "threading", "typing"} & loaded      # ~10 ms of each stop

    def run(*args):
        return subprocess.run([sys.executable, "-m", "kvmrun", *args], env=env,
                              capture_output=True, text=True, timeout=60)
    for name in ("web1", "no/such"):
        quick, full = run("stop", name), run("stop", name, "--force")
        assert quick.returncode == full.returncode != 0
        assert quick.stderr == full.stderr and quick.stderr.startswith("kvmrun: error: ")
    remote = subprocess.run([sys.executable, "-c", PROBE, "stop", "web1"],
                            env={**env, "KVMRUN_HOST": "nosuchhost.invalid",
                                 "KVMRUN_SSH": "false"},
                            capture_output=True, text=True, timeout=60)
    assert "typer" in remote.stdout.rsplit("\nMODULES ", 1)[1]   # another host: full CLI


def test_a_plain_start_of_a_new_profile_imports_no_typer_and_says_what_the_full_cli_says(
        tmp_path):
    """`kvmrun start PROFILE` with no cached launch is served before typer too (the profile
    machinery it needs, not the CLI framework); its errors are the full CLI's, word for word
    and exit code for exit code (`--no-unit` takes the full CLI): a profile error with its
    file and line, a missing file."""
    env = env_for(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmemory: lots\nnetwork: []\n")
    loaded, _ = imported_by(["start", bad], env)
    assert not heavy(loaded) - {"yaml"}           # yaml: the profile's; no typer, click
    assert "kvmrun.ops.launch" in loaded

    def run(*args):
        return subprocess.run([sys.executable, "-m", "kvmrun", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=60)
    said = {}
    for ref in (bad, tmp_path / "missing.yaml"):
        plain, full = run("start", ref), run("start", ref, "--no-unit")
        assert plain.returncode == full.returncode == 2
        assert plain.stderr == full.stderr
        said[ref.name] = plain.stderr
    assert said["bad.yaml"].startswith(f"kvmrun: error: {bad}:2: memory: 'lots' is not a "
                                       "size"), said
    assert said["missing.yaml"].startswith("kvmrun: error: "), said


def test_the_full_start_path_leaves_out_what_a_start_seldom_uses(tmp_path):
    """What a start of a new or changed profile imports before QEMU is spawned leaves out
    the modules only some profiles or only errors need (each ~1.5-3 ms of every start)."""
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\naccel: tcg\nmemory: 64M\nnetwork: []\n")
    code = ("import json, sys\nfrom kvmrun.ops import launch, profiles, quickstart, systemd\n"
            "profiles.load_profile(sys.argv[1])\nprint(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(profile)], env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60)
    loaded = set(json.loads(proc.stdout))
    assert "kvmrun.qemu.compile" in loaded
    assert not {"uuid", "platform", "fractions", "decimal", "difflib", "random"} & loaded


# What neither way of starting a guest imports (each ~2-5 ms of every start; issue 18): they
# come with the profiles, networks and verbs that use them.
NOT_ON_A_START = {"typing", "socket", "subprocess", "threading", "shutil", "bz2", "lzma",
                  "hashlib", "_hashlib", "uuid", "platform", "tempfile", "random",
                  "kvmrun.net.links", "kvmrun.net.defs", "kvmrun.net.isolated",
                  "kvmrun.net.nat", "kvmrun.net.hub", "kvmrun.ops.snapshots",
                  "kvmrun.ops.agent"}


def test_a_real_start_imports_only_what_its_profile_uses(tmp_path):
    """Real starts of a halted guest (QEMU paused, no disk, no network: it needs no kernel):
    the first on this host (it probes QEMU: subprocess), then one of a changed profile (the
    full path: YAML, the compiler), then one unchanged (the quick start). What the CLI
    process imported, after it returned."""
    env = env_for(tmp_path)
    profile = tmp_path / "p.yaml"
    try:
        for way, memory in (("first", 64), ("full path", 80), ("quick start", 80)):
            text = f"name: p\naccel: tcg\nmemory: {memory}M\nnetwork: []\nhalted: true\n"
            if not profile.exists() or profile.read_text() != text:   # rewritten: changed
                profile.write_text(text)
            loaded, out = imported_by(["start", profile], env)
            assert out.startswith("started p "), (way, out)
            if way != "first":
                assert not NOT_ON_A_START & loaded, (way, sorted(NOT_ON_A_START & loaded))
            assert ("kvmrun.qemu.compile" in loaded) == (way != "quick start")
            assert not heavy(loaded) - ({"yaml"} if way != "quick start" else set())
            killed = subprocess.run([sys.executable, "-m", "kvmrun", "kill", "p"], env=env,
                                    capture_output=True, text=True, timeout=60)
            assert killed.returncode == 0, killed.stderr
    finally:
        subprocess.run([sys.executable, "-m", "kvmrun", "kill", "p"], env=env,
                       capture_output=True, timeout=60)


def test_the_quick_start_imports_no_typer(tmp_path):
    """A profile with no cached launch: the quick path looks, finds nothing and hands over
    to the full CLI (which then loads the profile machinery, as it must)."""
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\naccel: tcg\nmemory: 64M\nnetwork: []\n")
    code = ("import json, sys\nfrom kvmrun.cli import quick\n"
            "print(quick._quick_start(sys.argv[1]))\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(profile)], env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=60)
    answer, modules = proc.stdout.splitlines()
    assert answer == "None"                       # nothing cached: the full path runs
    loaded = set(json.loads(modules))
    assert ours(loaded) == QUICK_START
    assert not heavy(loaded)
    assert not {"hashlib", "uuid", "subprocess", "shutil", "tempfile"} & loaded


def test_help_imports_no_profile_machinery(tmp_path):
    assert not HEAVY & modules_after(tmp_path, "--help")


def test_cmdline_needs_yaml_but_not_pydantic(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\naccel: tcg\nmemory: 64M\nnetwork: []\n")
    loaded = modules_after(tmp_path, "cmdline", str(profile))
    assert "kvmrun.qemu.compile" in loaded
    assert "pydantic" not in loaded
