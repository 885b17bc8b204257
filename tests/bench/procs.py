"""The benchmark's processes, where they run, and what /proc says about them.

Every process runs in its own session and logs to a file in the run's directory; stopping one kills
its whole group. On a machine with two or more CPUs the gateway gets the first one to itself and
everything else (the upstream, the load generator, redis-server, this runner) shares the rest, so
that the gateway's figures are not bent by its load.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, StartupError, free_port, wait_http

__all__ = [
    "Service",
    "cpu_plan",
    "cpu_seconds",
    "cpu_times",
    "cpu_usage",
    "machine_info",
    "pin",
    "rss_mib",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(the gateway's CPUs, everyone else's), or (None, None) when there is one CPU to share.

    Read from the CPUs this process may use: call it before pinning the runner itself."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per CPU: (busy, idle, steal) clock ticks since boot, from /proc/stat (idle includes iowait)."""
    times = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                continue
            name, *values = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            times[int(name[3:])] = (user + nice + system + irq + softirq, idle + iowait, steal)
    return times


def cpu_usage(before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]]) -> dict[str, Any]:
    """Per CPU, the busy, idle and steal share (%) between two :func:`cpu_times` readings."""
    usage = {}
    for cpu, (busy, idle, steal) in after.items():
        b0, i0, s0 = before.get(cpu, (busy, idle, steal))
        total = (busy - b0) + (idle - i0) + (steal - s0)
        if total > 0:
            usage[str(cpu)] = {
                "busy_pct": round(100 * (busy - b0) / total, 1),
                "idle_pct": round(100 * (idle - i0) / total, 1),
                "steal_pct": round(100 * (steal - s0) / total, 1),
            }
    return usage


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` now (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Service:
    """A child process in its own session, logging to ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_dir: Path,
        *,
        cpus: set[int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_dir / f"{name}.log"
        self.cpus = cpus
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, health_url: str, timeout: float = 30) -> Service:
        with self.log_path.open("ab") as log:
            log.write(f"--- {shlex.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **self.env} if self.env else None,
                start_new_session=True,
            )
        # Pinned before it has done anything worth measuring; threads it starts later inherit it.
        pin(self.process.pid, self.cpus)
        try:
            wait_http(health_url, timeout, status=200, process=self.process)
        except StartupError as exc:
            self.stop()
            raise StartupError(f"{self.name}: {exc.args[0]}\n--- log tail ---\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 10) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def upstream(log_dir: Path, cpus: set[int] | None) -> tuple[Service, str]:
    """The bench upstream, started; returns it and its base URL (with /v1)."""
    port = free_port()
    service = Service(
        "upstream", [sys.executable, "-m", "tests.bench.upstream", "--port", str(port)], log_dir, cpus=cpus
    )
    service.start(f"http://127.0.0.1:{port}/health")
    return service, f"http://127.0.0.1:{port}/v1"


def gateway(
    name: str, config_toml: str, log_dir: Path, cpus: set[int] | None, *, gc_stats: Path | None = None
) -> tuple[Service, str]:
    """The gateway on a free port with this config, started; returns it and its base URL (with /v1).
    With ``gc_stats``, run through tests.bench.gcstats, which writes its GC pauses there on SIGUSR1."""
    port = free_port()
    config = log_dir / f"{name}.toml"
    config.write_text(config_toml)
    module = "tests.bench.gcstats" if gc_stats else "gateway"
    command = [sys.executable, "-m", module, "serve", "--config", str(config)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {"PYTHONUNBUFFERED": "1"}
    if gc_stats:
        env["BENCH_GC_STATS"] = str(gc_stats)
    service = Service(name, command, log_dir, cpus=cpus, env=env)
    service.start(f"http://127.0.0.1:{port}/health")
    return service, f"http://127.0.0.1:{port}/v1"


def reference(kind: str, upstream_url: str, log_dir: Path, cpus: set[int] | None) -> tuple[Service, str]:
    """A minimal relay of tests/bench/reference.py in front of the upstream, started; returns it and
    its base URL (with /v1)."""
    port = free_port()
    command = [sys.executable, "-m", "tests.bench.reference", kind, "--port", str(port), "--upstream", upstream_url]
    service = Service(f"reference-{kind}", command, log_dir, cpus=cpus, env={"PYTHONUNBUFFERED": "1"})
    service.start(f"http://127.0.0.1:{port}/health")
    return service, f"http://127.0.0.1:{port}/v1"


def machine_info(plan: tuple[set[int] | None, set[int] | None]) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for package in ("litestar", "msgspec", "uvicorn", "uvloop", "httptools", "httpx", "httpx-aiohttp", "aiohttp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    gateway_cpus, other_cpus = plan
    return {
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "packages": versions,
        "pinning": {
            "gateway": sorted(gateway_cpus) if gateway_cpus else None,
            "upstream_loadgen_redis_runner": sorted(other_cpus) if other_cpus else None,
        },
    }
