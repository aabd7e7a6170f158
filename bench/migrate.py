#!/usr/bin/env python3
"""`kvmrun migrate` against raw QEMU's migrate, in one run, over the same ssh tunnel kind
(never part of `make test`; needs root: two "hosts" as in tests/integration/hosts.py).

    kvmrun   `kvmrun migrate web --to hostb` run on host a (in its namespace, with its
             environment), and back (`--shared-storage`; the tiny guest has no disk):
             whole-command wall time, and QEMU's downtime (query-migrate) as kvmrun
             reports it
    raw      the same guest's argv (from kvmrun's launch record) as a plain QEMU on host a,
             its target started through `ssh hostb qemu … -incoming unix:SOCK -S`, one
             `ssh -N -L` unix-socket forward, QMP `migrate`, poll until completed, `cont`
             there once it has loaded the stream (a `cont` before that only marks it to
             run, and ending the forward then cut the stream short): wall time from
             starting the target to `cont`, and QEMU's downtime

kvmrun and raw alternate (A B A B …). Prints a table and writes bench/results/migrate.json.
Targets from issue 14: downtime ≤ 100 ms for the tiny guest; total ≤ 1.2 × raw.

Usage: python bench/migrate.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmrun.guest.qmp import QMPClient  # noqa: E402
from tests.guest.build import build_guest  # noqa: E402
from tests.integration.conftest import KVMRUN  # noqa: E402
from tests.integration.hosts import Hosts  # noqa: E402


def wait_socket(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.02)


def qmp_wait(path: Path, timeout: float = 60) -> QMPClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QMPClient(path, timeout=10).connect()
        except Exception:                              # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Bench:
    def __init__(self, hosts: Hosts, env: dict):
        self.h, self.env = hosts, env

    def kvmrun(self, *args) -> subprocess.CompletedProcess:
        done = subprocess.run([str(KVMRUN), *map(str, args)], env=self.env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"kvmrun {args} failed: {done.stderr}")
        return done

    def kvmrun_migrate(self, src: str, dst: str) -> dict:
        start = time.monotonic()
        proc = self.h.popen_on(src, [KVMRUN, "migrate", "web", "--to", f"host{dst}",
                                     "--shared-storage", "--json"])
        out, err = proc.communicate(timeout=600)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"kvmrun migrate failed: {err.decode()}")
        result = json.loads(out)
        return {"total_s": wall, "downtime_ms": result["downtime_ms"]}

    def raw_pair(self, argv: list[str], src_dir: str, base: Path):
        """A raw source QEMU on host a from kvmrun's argv (its paths moved to `base`)."""
        raw = base / "raw-a"
        raw.mkdir()
        args = [a.replace(src_dir + "/", f"{raw}/") for a in argv]
        if "-runas" in args:          # raw QEMU stays root: it reaches the tunnel by path
            at = args.index("-runas")
            del args[at:at + 2]
        args = [a.replace("guest=web", "guest=rawweb") for a in args]
        log = open(base / "raw-a.log", "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", self.h["a"].netns, *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return proc, raw, args

    def raw_migrate(self, args: list[str], src: Path, base: Path, n: int, here: str,
                    there: str) -> dict:
        dst = base / f"raw-{there}{n}"
        dst.mkdir()
        target_args = [a.replace(f"{src}/", f"{dst}/") for a in args]
        incoming = dst / "in.sock"
        start = time.monotonic()
        target = subprocess.Popen(
            ["ssh", "-F", str(self.h.ssh_config), f"host{there}", "exec " + " ".join(
                f"'{a}'" for a in target_args) + f" -incoming unix:{incoming} -S"],
            stdin=subprocess.DEVNULL, stdout=open(base / f"raw-{there}{n}.log", "wb"),
            stderr=subprocess.STDOUT)
        wait_socket(incoming)
        local = src / f"out{n}.sock"
        tunnel = subprocess.Popen(
            ["ip", "netns", "exec", self.h[here].netns, "ssh", "-F", str(self.h.ssh_config),
             "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:{incoming}",
             f"host{there}"],
            stdin=subprocess.DEVNULL)
        wait_socket(local)
        with qmp_wait(src / "qmp-cli.sock") as qmp:
            qmp.execute("migrate-set-parameters", {"downtime-limit": 100})
            qmp.execute("migrate", {"uri": f"unix:{local}"})
            while (info := qmp.execute("query-migrate"))["status"] not in (
                    "completed", "failed", "cancelled"):
                time.sleep(0.05)
        with qmp_wait(dst / "qmp-cli.sock") as qmp:   # as kvmrun's finish: once it has
            while qmp.execute("query-status")["status"] == "inmigrate":   # loaded it all
                time.sleep(0.01)
            qmp.execute("cont")
        wall = time.monotonic() - start
        tunnel.terminate()
        tunnel.wait()
        if info["status"] != "completed":
            raise RuntimeError(f"raw migration {info['status']}")
        return {"total_s": wall, "downtime_ms": info.get("downtime"), "target": target,
                "dir": dst}


def stats(values: list[float]) -> str:
    return (f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"
            if values else "-")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    guest = build_guest("x86_64", "default")
    base = Path(tempfile.mkdtemp(prefix="kh-bench-", dir="/tmp"))
    hosts = Hosts(base)
    raw_procs = []
    try:
        hosts.setup()
        env = hosts.env({**os.environ, "KVMRUN_ACCEL": "tcg"})
        bench = Bench(hosts, env)
        import yaml
        profile = base / "web.yaml"
        profile.write_text(yaml.safe_dump({
            "name": "web", "accel": "tcg", "memory": "128M", "network": [],
            "kernel": {"path": str(guest.kernel), "initrd": str(guest.initrd),
                       "append": f"console={guest.console} quiet"},
            "ready": {"console": guest.ready_marker, "timeout": 180}}))
        bench.kvmrun("-H", "hosta", "start", profile)
        launch = json.loads((hosts["a"].run_dir / "web" / "launch.json").read_text())
        src_proc, src_dir, raw_args = bench.raw_pair(launch["argv"],
                                                     str(hosts["a"].run_dir / "web"), base)
        raw_procs.append(src_proc)
        qmp_wait(src_dir / "qmp-cli.sock").close()
        time.sleep(10)                                   # let the raw guest boot too
        results = {"kvmrun": [], "raw": []}
        where = "a"
        for n in range(runs):
            there = "b" if where == "a" else "a"
            results["kvmrun"].append(bench.kvmrun_migrate(where, there))
            raw = bench.raw_migrate(raw_args, src_dir, base, n, where, there)
            raw_procs.append(raw.pop("target"))
            src_dir_next = raw.pop("dir")
            with QMPClient(src_dir / "qmp-cli.sock", timeout=10) as qmp:
                try:
                    qmp.execute("quit")
                except Exception:                        # noqa: BLE001 - EOF is success
                    pass
            raw_args = [a.replace(f"{src_dir}/", f"{src_dir_next}/") for a in raw_args]
            src_dir = src_dir_next
            results["raw"].append(raw)
            where = there
        bench.kvmrun("-H", f"host{where}", "stop", "web")
        k_total = [r["total_s"] for r in results["kvmrun"]]
        r_total = [r["total_s"] for r in results["raw"]]
        k_down = [r["downtime_ms"] for r in results["kvmrun"] if r["downtime_ms"] is not None]
        r_down = [r["downtime_ms"] for r in results["raw"] if r["downtime_ms"] is not None]
        print(f"{'':<22}{'kvmrun':<26}{'raw QEMU':<26}ratio")
        print(f"{'total (s)':<22}{stats(k_total):<26}{stats(r_total):<26}"
              f"{statistics.median(k_total) / statistics.median(r_total):.2f}")
        print(f"{'downtime (ms, QEMU)':<22}{stats(k_down):<26}{stats(r_down):<26}")
        out = REPO / "bench" / "results" / "migrate.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"runs": runs, **results}, indent=1, default=str) + "\n")
        return 0
    finally:
        for proc in raw_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in sorted(base.glob("raw-*.log")):
            print(log.name, log.read_text(errors="replace")[-300:], file=sys.stderr)
        hosts.teardown()


if __name__ == "__main__":
    sys.exit(main())
