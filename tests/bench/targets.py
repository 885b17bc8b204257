"""The performance targets the figures are held against (the project's performance issue).

A target names a figure key (see report.py), the points it applies to (fnmatch patterns over point
names) and a bound. A figure without a target is shown without a verdict.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TARGETS", "Target", "target_for"]

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    figure: str
    points: tuple[str, ...]
    op: str
    limit: float
    text: str

    def applies(self, figure: str, point: str) -> bool:
        return figure == self.figure and any(fnmatch.fnmatchcase(point, pattern) for pattern in self.points)

    def check(self, value: float | None) -> bool | None:
        return None if value is None else _OPS[self.op](value, self.limit)

    @property
    def bound(self) -> str:
        return f"{self.op} {self.limit:g}"


TARGETS = (
    Target("added_p50_ms", ("non-stream c=1",), "<=", 0.5, "added latency, non-stream c=1, p50 <= 0.5 ms"),
    Target("added_p99_ms", ("non-stream c=1",), "<=", 2.0, "added latency, non-stream c=1, p99 <= 2 ms"),
    Target("cpu_us_per_request", ("non-stream c=*",), "<=", 200, "gateway CPU per non-stream request <= 200 us"),
    Target("rps", ("non-stream c=64",), ">=", 4000, ">= 4,000 req/s at c=64 with 1 worker"),
    Target("cpu_us_per_chunk", ("stream c=*", "stream *ms c=*"), "<=", 20, "<= 20 us CPU per relayed chunk"),
    Target("rps", ("stream c=64",), ">=", 500, ">= 500 streams/s of 64 tokens at c=64"),
    Target("rps_vs_direct_pct", ("stream 5ms c=256",), ">=", 95, "5 ms tokens, c=256: >= 95% of direct streams/s"),
    Target("ttft_added_p50_ms", ("stream 5ms c=64",), "<=", 1.0, "5 ms tokens, c=64: TTFT p50 within 1 ms of direct"),
    Target("ttft_added_p50_ms", ("stream 5ms c=256",), "<=", 3.0, "5 ms tokens, c=256: TTFT p50 within 3 ms"),
    Target(
        "gap_added_p99_ms",
        ("stream 5ms c=64", "stream 5ms c=256"),
        "<=",
        1.0,
        "5 ms tokens: inter-token gap p99 within 1 ms of direct",
    ),
    Target("rss_mib", ("open streams *",), "<", 300, "1,000 open streams: RSS < 300 MiB"),
    Target("errors", ("*",), "<=", 0, "no errors (1,000 open streams: no error)"),
    Target("rps_vs_bare_pct", ("realistic *",), ">=", 70, "keys+limits+history >= 70% of bare throughput"),
)


def target_for(figure: str, point: str) -> Target | None:
    return next((t for t in TARGETS if t.applies(figure, point)), None)
