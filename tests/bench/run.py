"""The benchmark runner: ``python -m tests.bench [--quick] [--json PATH] [--only SCENARIOS]``.

It starts the bench upstream, then for each point of the plan runs the load generator against the
upstream directly and through the gateway, reading the gateway's CPU time and memory from /proc
around and during each gateway run. The bare gateway serves every point but the realistic ones; for
those it is restarted with Redis and history on. It prints a table and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench import config, procs, profile
from tests.bench.report import render, rows_for
from tests.bench.scenarios import GROUPS, Point, plan, select
from tests.conftest import ROOT, RedisServer

__all__ = ["main"]

DEFAULT_JSON = ROOT / "bench-results" / "latest.json"
_RSS_SAMPLE_S = 0.05


class _Bench:
    def __init__(
        self,
        log_dir: Path,
        cpus: tuple[set[int] | None, set[int] | None],
        *,
        duration: float,
        warmup: float,
        py_spy: str | None = None,
        out_dir: Path | None = None,
        gc_stats: bool = False,
    ) -> None:
        self.log_dir = log_dir
        self.gc_stats = log_dir / "gc.json" if gc_stats else None
        self.py_spy = py_spy
        self.out_dir = out_dir or log_dir
        self.duration = duration
        self.warmup = warmup
        self.gateway_cpus, self.other_cpus = cpus
        self.services: list[procs.Service] = []
        self.redis: RedisServer | None = None
        self.upstream: procs.Service | None = None
        self.upstream_url = ""
        self.gateway: procs.Service | None = None
        self.gateway_url = ""
        self.gateway_config = ""

    # -- processes ------------------------------------------------------------------------------

    def start_upstream(self) -> None:
        self.upstream, self.upstream_url = procs.upstream(self.log_dir, self.other_cpus)
        self.services.append(self.upstream)

    def start_gateway(self, kind: str) -> None:
        self.stop_gateway()
        if kind.startswith("reference-"):
            self.gateway, self.gateway_url = procs.reference(
                kind.removeprefix("reference-"), self.upstream_url, self.log_dir, self.gateway_cpus
            )
            self.gateway_config = kind
            self.services.append(self.gateway)
            return
        if kind == "realistic":
            if self.redis is None:
                self.redis = RedisServer(self.log_dir).start()
                procs.pin(self.redis.process.pid, self.other_cpus)  # type: ignore[union-attr]
            toml = config.realistic(self.upstream_url, self.redis.url)
        else:
            toml = config.bare(self.upstream_url)
        self.gateway, self.gateway_url = procs.gateway(
            f"gateway-{kind}", toml, self.log_dir, self.gateway_cpus, gc_stats=self.gc_stats
        )
        self.gateway_config = kind
        self.services.append(self.gateway)

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def close(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.redis is not None:
            self.redis.stop()

    def _gc_stats(self, pid: int) -> dict[str, Any] | None:
        assert self.gc_stats is not None
        self.gc_stats.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                return json.loads(self.gc_stats.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.02)
        return None

    # -- one measurement -----------------------------------------------------------------------

    def measure(self, point: Point, *, through_gateway: bool) -> dict[str, Any]:
        base = self.gateway_url if through_gateway else self.upstream_url
        command = [sys.executable, "-m", "tests.bench.loadgen", "--url", f"{base}/chat/completions"]
        command += point.loadgen_args()
        if point.requests is None:
            command += ["--duration", str(self.duration), "--warmup", str(self.warmup)]
        assert self.upstream is not None
        watched = self.gateway if through_gateway else None
        upstream_cpu = procs.cpu_seconds(self.upstream.pid)
        cpu = procs.cpu_seconds(watched.pid) if watched else 0.0
        rss_before = procs.rss_mib(watched.pid) if watched else 0.0
        rss_max = rss_before
        machine_cpu = procs.cpu_times()
        if watched is not None and self.gc_stats is not None:
            os.kill(watched.pid, signal.SIGUSR1)  # forget the collections before this run
        with (self.log_dir / "loadgen.log").open("ab") as log:
            t0 = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
            procs.pin(process.pid, self.other_cpus)
            spy = raw = None
            if watched is not None and self.py_spy and point.requests is None:
                raw = self.out_dir / f"profile-{_slug(point.name)}.raw"
                spy = profile.record(
                    self.py_spy, watched.pid, self.warmup + self.duration, raw, self.log_dir / "py-spy.log"
                )
                procs.pin(spy.pid, self.other_cpus)
            deadline = t0 + self.warmup + self.duration + 120
            while process.poll() is None:
                if watched is not None:
                    rss_max = max(rss_max, procs.rss_mib(watched.pid))
                if time.perf_counter() > deadline:
                    process.kill()
                time.sleep(_RSS_SAMPLE_S)
            wall = time.perf_counter() - t0
            out = process.stdout.read() if process.stdout else b""  # small: one JSON line
        if process.returncode != 0:
            raise RuntimeError(f"loadgen failed ({process.returncode}) for {point.name}; see {log.name}")
        result: dict[str, Any] = json.loads(out)
        result["machine_cpu"] = procs.cpu_usage(machine_cpu, procs.cpu_times())
        if watched is not None and self.gc_stats is not None:
            result["gc"] = self._gc_stats(watched.pid)
        if spy is not None and raw is not None:
            spy.wait(30)
            summary = raw.with_suffix(".txt")
            summary.write_text(f"{point.name}\n{profile.summarize(raw)}\n")
            result["profile"] = {"raw": str(raw), "summary": str(summary)}
        upstream_cpu = procs.cpu_seconds(self.upstream.pid) - upstream_cpu
        result["upstream_cpu_s"] = round(upstream_cpu, 3)
        elapsed = result["elapsed_s"] or wall
        if watched is None:
            result["core_busy_pct"] = round(100 * (upstream_cpu + result["loadgen_cpu_s"]) / elapsed, 1)
            return result
        cpu = procs.cpu_seconds(watched.pid) - cpu
        served = result["completed_total"] + result["errors"]
        result |= {
            "gateway_config": self.gateway_config,
            "gateway_affinity": sorted(os.sched_getaffinity(watched.pid)) if hasattr(os, "sched_getaffinity") else None,
            "gateway_cpu_s": round(cpu, 3),
            "core_busy_pct": round(100 * cpu / elapsed, 1),
            "cpu_us_per_request": round(cpu * 1e6 / served, 1) if served else None,
            "rss_mib_before": round(rss_before, 1),
            "rss_mib_max": round(rss_max, 1),
            "rss_mib_after": round(procs.rss_mib(watched.pid), 1),
        }
        if point.stream:
            events = result["events_total"]
            result["cpu_us_per_chunk"] = round(cpu * 1e6 / events, 2) if events else None
        return result


def _disturbed(results: list[dict[str, Any]], gateway_cpus: set[int] | None) -> list[str]:
    """Notes for gateway runs during which something else kept the gateway's CPU busy."""
    if not gateway_cpus:
        return []
    notes = []
    for point in results:
        gateway = point.get("gateway") or {}
        busy = sum(gateway.get("machine_cpu", {}).get(str(c), {}).get("busy_pct", 0.0) for c in gateway_cpus)
        other = busy - gateway.get("core_busy_pct", 0.0)
        if other > 10:
            notes.append(f"{point['name']}: other processes used {other:.0f}% of the gateway's CPU: figures disturbed")
    return notes


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _run(points: list[Point], bench: _Bench) -> list[dict[str, Any]]:
    bench.start_upstream()
    results: dict[str, dict[str, Any]] = {}
    for point in points:
        if bench.gateway is None or bench.gateway_config != point.config:
            bench.start_gateway(point.config)
        print(f"  {point.name} ...", end="", flush=True, file=sys.stderr)
        entry: dict[str, Any] = {
            "name": point.name,
            "group": point.group,
            "params": {
                "concurrency": point.concurrency,
                "stream": point.stream,
                "max_tokens": point.max_tokens if point.stream else None,
                "token_delay": point.token_delay,
                "requests": point.requests,
                "config": point.config,
            },
        }
        reused = results.get(point.direct_from) if point.direct_from else None
        if reused is not None and reused.get("direct") is not None:
            entry["direct"] = reused["direct"]
            entry["direct_reused_from"] = point.direct_from
        else:
            entry["direct"] = bench.measure(point, through_gateway=False)
        entry["gateway"] = bench.measure(point, through_gateway=True)
        if reused is not None:
            entry["bare_rps"] = reused["gateway"]["rps"]
        results[point.name] = entry
        print(f" {entry['gateway']['rps']:,.0f}/s through the gateway", file=sys.stderr)
    return list(results.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description="Gateway benchmark: direct vs through.")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer points, 2 s each)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write figures ({DEFAULT_JSON})")
    parser.add_argument("--only", help=f"comma-separated groups ({', '.join(GROUPS)}) or point-name patterns")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 5, quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (default 1, quick 0.5)")
    parser.add_argument("--profile", action="store_true", help="record each gateway run with py-spy (see profile.py)")
    parser.add_argument("--gc", action="store_true", help="time the gateway's GC collections (see gcstats.py)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs after a successful run")
    args = parser.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    points = select(plan(args.quick), args.only)
    if not points:
        parser.error(f"--only {args.only!r} matches no point; groups: {', '.join(GROUPS)}")

    py_spy = None
    if args.profile:
        py_spy = profile.find_py_spy()
        if py_spy is None:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    cpus = procs.cpu_plan()
    machine = procs.machine_info(cpus)
    # The runner mostly sleeps, but not on the gateway's CPU (its children are pinned explicitly).
    procs.pin(os.getpid(), cpus[1])
    log_dir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    print(
        f"gateway benchmark ({'quick' if args.quick else 'full'}): {len(points)} points, {duration:g} s each "
        f"after {warmup:g} s warm-up; logs in {log_dir} (kept if it fails)",
        file=sys.stderr,
    )
    if machine["pinning"]["gateway"] is None:
        print("  one CPU only: the gateway shares it with the load generator", file=sys.stderr)
    started = time.time()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    bench = _Bench(
        log_dir, cpus, duration=duration, warmup=warmup, py_spy=py_spy, out_dir=args.json.parent, gc_stats=args.gc
    )
    try:
        results = _run(points, bench)
    except Exception:
        for service in bench.services:
            print(f"--- {service.name} log tail ---\n{service.log_tail()}", file=sys.stderr)
        raise
    finally:
        bench.close()
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)

    notes = [
        "bare gateway: one backend, no Redis, history off ([history] store_all = false)",
        "realistic gateway: redis-server, [history] store_all = true; " + config.KEYS_AND_LIMITS_NOTE,
        "reference litestar/litestar-asgi/asgi: the minimal relays of tests/bench/reference.py in the gateway's place "
        "(no gateway work; 'bare is N%' compares the bare gateway's throughput with theirs)",
        "direct = the load generator against the bench upstream, no gateway: the ceiling of this set-up",
        "core busy %: direct = load generator + upstream CPU over the run (they share one core); "
        "gateway = the gateway process's CPU over the run",
    ]
    if py_spy:
        notes.append(
            f"profiled with py-spy (gateway figures a little worse than unprofiled): {args.json.parent}/profile-*"
        )
    notes += _disturbed(results, bench.gateway_cpus)
    rows = [row for point in results for row in rows_for(point)]
    table = render(rows, notes)
    print(table)
    document = {
        "mode": "quick" if args.quick else "full",
        "profiled": bool(py_spy),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "duration_s": duration,
        "warmup_s": warmup,
        "machine": machine,
        "configs": {
            "bare": config.bare("<upstream>/v1"),
            "realistic": config.realistic("<upstream>/v1", "<redis>"),
            "keys_and_limits": config.KEYS_AND_LIMITS_NOTE if config.keys_and_limits() is None else "on",
        },
        "notes": notes,
        "points": results,
        "figures": [row.as_json() for row in rows],
        "table": table,
    }
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nfigures written to {os.path.relpath(args.json)} ({document['wall_s']:g} s)", file=sys.stderr)
    return 0
