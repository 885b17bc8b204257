"""The gateway with its garbage-collector pauses recorded: ``python -m tests.bench.gcstats serve ...``.

Used by ``python -m tests.bench --gc`` instead of ``python -m gateway``: the same ``gateway serve``
command line, plus ``gc.callbacks`` that time every collection. On SIGUSR1 the process writes what it
timed since the last SIGUSR1 to the JSON file named by ``$BENCH_GC_STATS`` and starts over, so the runner
signals once before a run and once after it. A callback per collection costs next to nothing; the
gateway's own code is untouched.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from typing import Any

__all__ = ["main"]

_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_started = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses[info["generation"]].append(time.perf_counter() - _started[0])


def _dump(signum: int, frame: object) -> None:
    stats = {}
    for generation, pauses in _pauses.items():
        ordered = sorted(pauses)
        stats[f"gen{generation}"] = {
            "collections": len(ordered),
            "total_ms": round(sum(ordered) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2) if ordered else 0.0,
        }
        pauses.clear()
    path = os.environ.get("BENCH_GC_STATS")
    if path:
        with open(path, "w") as f:
            json.dump(stats, f)


def main() -> int:
    gc.callbacks.append(_callback)
    signal.signal(signal.SIGUSR1, _dump)
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
