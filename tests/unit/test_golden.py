"""Golden command lines: each profile compiles to exactly the argv in its `.args` file.

    tests/unit/golden/NAME.yaml     -> golden/NAME.args           one feature per profile
    profiles/NAME.yaml              -> golden/profiles/NAME.args  every shipped profile
    tests/unit/golden/cli/NAME.cmd  -> golden/cli/NAME.args       a `kvmrun` command line

A golden file holds one option with its values per line, then a `# helper NAME: ARGV` line
per helper daemon the guest needs (virtiofsd, swtpm). The host is pinned: x86_64 with
working KVM and fixed UEFI paths; a `# golden-host: kvm=false` line in a profile takes KVM
away. Run paths are /run/kvmrun/NAME; the profile's directory shows as @PROFILE_DIR@, the
checkout as @REPO@ and the CLI's working directory as @CWD@, so goldens do not depend on
where the checkout lives.

`KVMRUN_REGEN_GOLDEN=1` rewrites the golden files and still fails, so a human reads the diff.
Whether QEMU accepts these command lines is tests/integration/test_oracle.py's job.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from kvmrun import arch as archmod
from kvmrun.qemu import host as hostmod
from kvmrun.cli import main
from kvmrun.qemu.compile import HostFacts, build
from kvmrun.paths import RunPaths
from kvmrun.profile import load

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
PROFILES = ROOT / "profiles"
REGEN = os.environ.get("KVMRUN_REGEN_GOLDEN") == "1"

UEFI = {"x86_64": "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "aarch64": "/usr/share/AAVMF/AAVMF_CODE.fd",
        "arm": "/usr/share/AAVMF/AAVMF32_CODE.fd"}
SECURE = {"x86_64": "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
          "aarch64": "/usr/share/AAVMF/AAVMF_CODE.ms.fd"}
HELPERS = {"virtiofsd": "/usr/lib/qemu/virtiofsd", "swtpm": "/usr/bin/swtpm"}
KVM_HOST = HostFacts(machine="x86_64", kvm=True, uefi=UEFI, uefi_secure=SECURE, **HELPERS)
TCG_HOST = HostFacts(machine="x86_64", kvm=False, uefi=UEFI, uefi_secure=SECURE, **HELPERS)


def run_paths(name: str) -> RunPaths:
    return RunPaths(Path("/run/kvmrun") / name,
                    nvram=Path("/var/lib/kvmrun/nvram") / f"{name}_VARS.fd",
                    tpm=Path("/var/lib/kvmrun/tpm") / name)


def host_for(profile_file: Path) -> HostFacts:
    directives = [line for line in profile_file.read_text().splitlines()
                  if line.startswith("# golden-host:")]
    return TCG_HOST if "# golden-host: kvm=false" in directives else KVM_HOST


def render(argv: list[str], placeholders: dict[str, str]) -> str:
    """One option with its values per line; known directories replaced by placeholders."""
    def place(arg: str) -> str:
        for real, mark in placeholders.items():
            arg = arg.replace(real, mark)
        return arg
    lines: list[list[str]] = [[argv[0]]]
    for arg in argv[1:]:
        if arg.startswith("-"):
            lines.append([arg])
        else:
            lines[-1].append(place(arg))
    return "".join(shlex.join(line) + "\n" for line in lines)


def check_golden(golden: Path, actual: str) -> None:
    if REGEN:
        if not golden.exists() or golden.read_text() != actual:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(actual)
            pytest.fail(f"rewrote {golden.relative_to(ROOT)}: review the diff, then run "
                        "again without KVMRUN_REGEN_GOLDEN")
        return
    assert golden.exists(), (f"{golden.relative_to(ROOT)} is missing; create it with "
                             "KVMRUN_REGEN_GOLDEN=1 and review it")
    assert actual == golden.read_text()


@pytest.fixture
def x86_64_host(monkeypatch):
    """Profiles without `arch:` mean the host's architecture: pin it to x86_64."""
    monkeypatch.setattr(archmod, "host_machine", lambda: "x86_64")


# ---------------------------------------------------------------- the cases

def profile_cases() -> list[tuple[Path, Path]]:
    """(profile, golden) for the test profiles and every shipped profile."""
    cases = [(y, y.with_suffix(".args")) for y in sorted(GOLDEN.glob("*.yaml"))]
    cases += [(y, GOLDEN / "profiles" / f"{y.stem}.args") for y in sorted(PROFILES.glob("*.yaml"))]
    return cases


def cli_cases() -> list[tuple[Path, Path]]:
    return [(c, c.with_suffix(".args")) for c in sorted((GOLDEN / "cli").glob("*.cmd"))]


def case_id(case: tuple[Path, Path]) -> str:
    return str(case[1].relative_to(GOLDEN).with_suffix(""))


@pytest.mark.parametrize("case", profile_cases(), ids=case_id)
def test_profile_compiles_to_golden(case, x86_64_host):
    profile_file, golden = case
    profile = load(profile_file)
    compiled = build(profile, host_for(profile_file), run_paths(profile.name))
    places = {str(profile_file.parent): "@PROFILE_DIR@", str(ROOT): "@REPO@"}
    helpers = "".join(f"# helper {h.name}: {shlex.join(h.argv)}\n" for h in compiled.helpers)
    for real, mark in places.items():
        helpers = helpers.replace(real, mark)
    check_golden(golden, render(compiled.argv, places) + helpers)


@pytest.mark.parametrize("case", cli_cases(), ids=case_id)
def test_cli_compiles_to_golden(case, x86_64_host, tmp_path, monkeypatch, capsys):
    """The one-off flags, through the real entry point (`kvmrun cmdline … --json`)."""
    command, golden = case
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(hostmod, "probe", lambda: KVM_HOST)
    monkeypatch.setenv("KVMRUN_RUN_DIR", "/run/kvmrun")
    monkeypatch.setenv("KVMRUN_DATA_DIR", "/var/lib/kvmrun")
    for var in ("KVMRUN_CONFIG_DIR", "KVMRUN_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(SystemExit) as exit_:
        main([*shlex.split(command.read_text()), "--json"])
    captured = capsys.readouterr()
    assert exit_.value.code == 0, captured.err
    assert "Traceback" not in captured.err
    check_golden(golden, render(json.loads(captured.out), {str(cwd): "@CWD@"}))


def test_every_golden_file_has_its_source():
    """A golden nobody compiles is an error, and so is a source without its golden."""
    expected = {g for _, g in profile_cases() + cli_cases()}
    present = set(GOLDEN.rglob("*.args"))
    assert sorted(map(str, present - expected)) == [], "golden files without a source"
    assert sorted(map(str, expected - present)) == [], "sources without a golden file"
