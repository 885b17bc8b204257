"""The benchmark's machinery works: upstream, load generator, runner and report. Nothing here looks at
speed; the benchmark itself (tests/bench, not collected) is ``make bench``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import procs
from tests.bench.report import render, rows_for
from tests.conftest import ROOT

PERCENTILES = {"p50", "p90", "p99", "max", "mean"}
COMMON_KEYS = {"completed", "completed_total", "errors", "error_kinds", "rps", "latency_ms", "window_s", "elapsed_s"}
STREAM_KEYS = {"tokens", "tokens_per_s", "events_total", "max_open", "ttft_ms", "ttlt_ms", "gap_ms", "max_gap_ms"}


@pytest.fixture(scope="module")
def bench_upstream(tmp_path_factory: pytest.TempPathFactory) -> Any:
    service, base_url = procs.upstream(tmp_path_factory.mktemp("bench"), None)
    try:
        yield base_url
    finally:
        service.stop()


def _loadgen(base_url: str, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "tests.bench.loadgen", "--url", f"{base_url}/chat/completions", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_non_stream_requests_are_counted(bench_upstream: str) -> None:
    result = _loadgen(bench_upstream, "--concurrency", "8", "--requests", "300")
    assert COMMON_KEYS <= result.keys()
    assert (result["completed"], result["completed_total"], result["errors"]) == (300, 300, 0)
    assert set(result["latency_ms"]) == PERCENTILES
    assert result["latency_ms"]["p50"] > 0
    assert "tokens" not in result


def test_stream_tokens_and_events_are_counted(bench_upstream: str) -> None:
    result = _loadgen(bench_upstream, "--concurrency", "8", "--requests", "200", "--stream", "--max-tokens", "16")
    assert COMMON_KEYS | STREAM_KEYS <= result.keys()
    assert (result["completed"], result["errors"]) == (200, 0)
    assert result["tokens"] == 200 * 16
    # role, 16 tokens, finish_reason, usage, [DONE]
    assert result["events_total"] == 200 * 20
    assert 1 <= result["max_open"] <= 8
    assert result["ttft_ms"]["p50"] <= result["ttlt_ms"]["p50"]


def test_token_delay_paces_the_stream(bench_upstream: str) -> None:
    result = _loadgen(
        bench_upstream,
        "--concurrency",
        "4",
        "--requests",
        "4",
        "--stream",
        "--max-tokens",
        "4",
        "--token-delay",
        "0.02",
    )
    assert (result["completed"], result["errors"], result["tokens"]) == (4, 0, 16)
    assert result["max_open"] == 4
    # Timers never fire early by more than the loop clock's millisecond rounding.
    assert result["gap_ms"]["p50"] >= 18
    assert result["ttlt_ms"]["p50"] >= 3 * 18


def test_runner_writes_the_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "tests.bench", "--only", "non-stream c=1", "--duration", "0.3", "--warmup", "0.1"]
    done = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "non-stream c=1" in done.stdout and "latency p50 ms" in done.stdout
    document = json.loads(out.read_text())
    assert {"machine", "points", "figures", "notes", "table"} <= document.keys()
    assert {"nproc", "python", "git_commit"} <= document["machine"].keys()
    (point,) = document["points"]
    assert point["direct"]["errors"] == 0 and point["gateway"]["errors"] == 0
    assert point["gateway"]["completed"] > 0
    assert {"gateway_cpu_s", "cpu_us_per_request", "rss_mib_max"} <= point["gateway"].keys()
    checked = {f["key"]: f for f in document["figures"] if f["target"]}
    assert {"added_p50_ms", "added_p99_ms", "cpu_us_per_request", "errors"} <= checked.keys()
    assert checked["errors"]["pass"] is True


def test_report_marks_targets() -> None:
    def run(rps: float, p50: float, p99: float) -> dict[str, Any]:
        return {"rps": rps, "latency_ms": {"p50": p50, "p99": p99}, "errors": 0, "core_busy_pct": 50}

    point = {
        "name": "non-stream c=1",
        "group": "non-stream",
        "params": {"stream": False, "token_delay": 0.0},
        "direct": run(10_000, 0.1, 0.2),
        "gateway": run(1_000, 0.4, 3.0) | {"cpu_us_per_request": 150.0},
    }
    rows = {row.key: row for row in rows_for(point) if row.key}
    assert rows["added_p50_ms"].ok is True
    assert rows["added_p99_ms"].ok is False
    assert rows["cpu_us_per_request"].ok is True
    table = render(list(rows.values()))
    assert "PASS" in table and "FAIL" in table and "targets: 3 of 4 figures pass" in table


@pytest.mark.parametrize("reference", [None, "asgi", "litestar"])
@pytest.mark.parametrize(("tokens", "lockstep"), [(0, False), (4, False), (4, True)])
def test_instruction_counts_drive_the_app_they_name(
    bench_upstream: str, reference: str | None, tokens: int, lockstep: bool
) -> None:
    # What valgrind runs for `python -m tests.bench.instructions`, without valgrind: the driver fails
    # on any answer but a 200, so every configuration it counts must relay.
    command = [sys.executable, "-m", "tests.bench.instructions", "--drive", bench_upstream, "--requests", "8"]
    command += ["--stream", "--tokens", str(tokens)] if tokens else []
    command += ["--lockstep"] if lockstep else []
    command += ["--reference", reference] if reference else []
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
