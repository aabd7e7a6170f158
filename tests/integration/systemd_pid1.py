"""A real systemd for tests: /lib/systemd/systemd as PID 1 of new PID, mount and cgroup
namespaces, on a host whose own init is not systemd (a container, CI).

What it is given, so that nothing of the host changes:
- its own cgroups: a child `kvmrun-sd-ID` of this process's cgroup in every v1 hierarchy
  (cgroup v1 here; cpuset is left out: a new cpuset cgroup starts with no CPUs), bound
  onto a private tmpfs at /sys/fs/cgroup, so its `init.scope`, `system.slice` and the
  remount of /sys/fs/cgroup read-only stay inside the namespace;
- a private /run (so /run/systemd/system exists only for it: sd_booted() in there) and a
  private /etc/systemd/system (units that `kvmrun systemd install` writes vanish with it);
- that directory as its only unit path (SYSTEMD_UNIT_PATH), holding only the targets and
  slice a service's default dependencies name (UNITS): nothing of sysinit.target's host
  setup can start. It shares /tmp, /var and the kernel with the host, and
  systemd-tmpfiles-setup alone would empty the host's /tmp (`D /tmp`), journald would
  write to /var/log/journal, systemd-update-utmp to /var/log/wtmp, systemd-sysctl to the
  host's kernel;
- `container=kvmrun-test` (systemd then skips hardware and kernel setup) and a target of its
  own (nothing of the host's boot starts); its log goes to a file bound on /dev/console.

Everything that talks to it runs through `nsenter` into those namespaces (`run`), kvmrun
included: PIDs in state.json are the namespace's. Ending it is SIGKILL to its PID 1, which
ends every process of the namespace, then its cgroups are removed.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
CGROUP = Path("/sys/fs/cgroup")
SKIP = {"cpuset", "unified"}
# what DefaultDependencies= and kvmrun's units name (Requires=, After=, WantedBy=)
UNITS = ("sysinit.target", "basic.target", "shutdown.target", "final.target",
         "umount.target", "network.target", "network-online.target", "remote-fs.target",
         "multi-user.target")

INNER = r"""#!/bin/bash
set -e
ID="$1"; CONSOLE="$2"; SCRATCH="$3"; UNITS="$4"
mount --make-rprivate /
mkdir -p "$SCRATCH/host-cg"
mount --rbind /sys/fs/cgroup "$SCRATCH/host-cg"
mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
for h in "$SCRATCH"/host-cg/*/; do
  n=$(basename "$h")
  [ -d "$h$ID" ] || continue
  mkdir "/sys/fs/cgroup/$n"
  mount --bind "$h$ID" "/sys/fs/cgroup/$n"
done
umount -l "$SCRATCH/host-cg"
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock
mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system
printf '[Unit]\nDescription=kvmrun test target\n' > /etc/systemd/system/kvmrun-test.target
for unit in $UNITS; do ln -s "/lib/systemd/system/$unit" "/etc/systemd/system/$unit"; done
mount --bind "$CONSOLE" /dev/console
export container=kvmrun-test SYSTEMD_UNIT_PATH=/etc/systemd/system
exec /lib/systemd/systemd --system --unit=kvmrun-test.target --log-target=console \
    --log-level=info systemd.legacy_systemd_cgroup_controller=1
"""


class Unavailable(Exception):
    """Why a real systemd cannot run here (the test skips with this)."""


def _own_cgroups() -> dict[str, str]:
    """{hierarchy directory name: this process's path in it} for the v1 hierarchies."""
    found = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            name = c.removeprefix("name=")
            if name and name not in SKIP and (CGROUP / name).is_dir():
                found[name] = path
    return found


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class RealSystemd:
    def __init__(self, scratch: Path):
        if os.geteuid() != 0:
            raise Unavailable("needs root (namespaces, cgroups)")
        for tool in ("unshare", "nsenter", "systemctl"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is missing")
        if not SYSTEMD.exists():
            raise Unavailable(f"{SYSTEMD} is missing (apt-get install systemd)")
        own = _own_cgroups()
        if "systemd" not in own:
            raise Unavailable("no name=systemd cgroup v1 hierarchy at /sys/fs/cgroup/systemd")
        self.scratch = scratch
        self.id = f"kvmrun-sd-{uuid.uuid4().hex[:8]}"
        self.cgroups = [CGROUP / name / path.lstrip("/") / self.id for name, path in own.items()]
        self.console = scratch / "console.log"
        self.console.write_text("")
        inner = scratch / "inner.sh"
        inner.write_text(INNER)
        inner.chmod(0o755)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        try:
            for cg in self.cgroups:
                cg.mkdir()
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--cgroup",
                 "--kill-child", str(inner), self.id, str(self.console), str(scratch),
                 " ".join(UNITS)],
                stdin=subprocess.DEVNULL, stdout=open(scratch / "unshare.log", "w"),
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self._join_cgroups)
            self._wait_running()
        except BaseException:
            self.close()
            raise

    def _join_cgroups(self) -> None:           # in the child, before exec: unshare --cgroup
        for cg in self.cgroups:                # then makes these its namespace's roots
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    def _wait_running(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"systemd did not start: {self.log()}")
            kids = [p for p in _children(self.proc.pid)
                    if Path(f"/proc/{p}/comm").read_text().strip() == "systemd"]
            if kids:
                self.pid = kids[0]
                state = self.run("systemctl", "is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise Unavailable(f"systemd did not reach running in {timeout:g}s: {self.log()}")

    def log(self) -> str:
        return (self.scratch / "unshare.log").read_text() + self.console.read_text()[-4000:]

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-C", "--", *map(str, args)]

    def run(self, *args, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        """A command inside systemd's namespaces (systemctl talks to it there)."""
        return subprocess.run(self.argv(*args), env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.pid is not None:
                try:
                    fd = os.pidfd_open(self.pid)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    select.select([fd], [], [], 30)
                    os.close(fd)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for cg in self.cgroups:                # children first; a cgroup empties once its
            if not cg.exists():                # last process is reaped
                continue
            for sub in sorted((p for p in cg.rglob("*") if p.is_dir()),
                              key=lambda p: -len(p.parts)):
                _rmdir(sub)
            _rmdir(cg)


def _rmdir(path: Path, tries: int = 50) -> None:
    for _ in range(tries):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:                        # EBUSY while the kernel reaps its last task
            time.sleep(0.1)
    path.rmdir()
