"""Figures out of the measurements, checked against the targets, as a table and as JSON rows.

A point's measurement is the load generator's JSON for the direct run and for the gateway run, plus
what the runner read from /proc (see run.py). Each row is one figure: its direct and gateway values,
the difference that matters for it (added ms, a ratio, a percentage), and a verdict when a target
applies. Figure keys, for targets.py:

    rps                  gateway req/s or streams/s
    rps_vs_direct_pct    gateway streams/s as a percentage of direct
    rps_vs_bare_pct      realistic gateway throughput as a percentage of the bare gateway's
                         (reference points show the reverse, untargeted: bare as a percentage of
                         the minimal relay's)
    added_p50_ms/p99     gateway latency minus direct latency
    ttft_added_p50_ms    gateway TTFT p50 minus direct
    gap_added_p99_ms     gateway inter-token gap p99 minus direct
    cpu_us_per_request   gateway CPU time / requests (or streams) it served
    cpu_us_per_chunk     gateway CPU time / SSE events it relayed
    rss_mib              the gateway's largest VmRSS during the run
    errors               failed requests through the gateway
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.bench.targets import Target, target_for

__all__ = ["Row", "render", "rows_for"]


@dataclass
class Row:
    point: str
    label: str
    direct: float | None
    gateway: float | None
    delta: str = ""
    key: str | None = None
    value: float | None = None
    """What the target is held against (the gateway value unless the figure is a difference)."""
    target: Target | None = None
    ok: bool | None = None
    digits: int = 2

    def as_json(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "figure": self.label,
            "key": self.key,
            "direct": self.direct,
            "gateway": self.gateway,
            "delta": self.delta,
            "value": self.value,
            "target": self.target.bound if self.target else None,
            "target_text": self.target.text if self.target else None,
            "pass": self.ok,
        }


def _at(data: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = data
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value if isinstance(value, int | float) else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100.0 * a / b


def _added(value: float | None, unit: str = "ms") -> str:
    return "" if value is None else f"{value:+.2f} {unit}"


def _ratio(g: float | None, d: float | None) -> str:
    return "" if g is None or not d else f"x{g / d:.2f}"


def rows_for(point: dict[str, Any]) -> list[Row]:
    name, group = point["name"], point["group"]
    direct, gateway = point.get("direct"), point.get("gateway")
    stream = bool(point["params"]["stream"])
    rows: list[Row] = []

    def row(label: str, path: tuple[str, ...], delta: str = "", key: str | None = None, **kw: Any) -> Row:
        r = Row(name, label, _at(direct, *path), _at(gateway, *path), delta, key, **kw)
        rows.append(r)
        return r

    def gateway_row(label: str, field: str, key: str | None = None, digits: int = 1) -> None:
        rows.append(Row(name, label, None, _at(gateway, field), key=key, digits=digits))

    d_rps, g_rps = _at(direct, "rps"), _at(gateway, "rps")
    unit = "streams/s" if stream else "req/s"
    if group == "realistic":
        bare = point.get("bare_rps")
        pct = _pct(g_rps, bare)
        row(unit, ("rps",), "" if pct is None else f"{pct:.0f}% of bare", key="rps_vs_bare_pct", value=pct, digits=0)
    elif group == "reference":
        pct = _pct(point.get("bare_rps"), g_rps)
        row(unit, ("rps",), "" if pct is None else f"bare is {pct:.0f}%", digits=0)
    elif group == "stream-delay":
        pct = _pct(g_rps, d_rps)
        row(unit, ("rps",), "" if pct is None else f"{pct:.1f}% of direct", "rps_vs_direct_pct", value=pct, digits=1)
    elif group != "open-streams":
        row(unit, ("rps",), _ratio(g_rps, d_rps), "rps", value=g_rps, digits=0)

    if not stream:
        for q in ("p50", "p99"):
            added = _sub(_at(gateway, "latency_ms", q), _at(direct, "latency_ms", q))
            row(f"latency {q} ms", ("latency_ms", q), _added(added), f"added_{q}_ms", value=added)
        gateway_row("gateway CPU/request us", "cpu_us_per_request", "cpu_us_per_request")
    elif group == "open-streams":
        row("streams open at once", ("max_open",), digits=0)
        row("streams completed", ("completed",), digits=0)
        rss = _at(gateway, "rss_mib_max")
        before = _at(gateway, "rss_mib_before")
        delta = "" if before is None else f"idle {before:.0f} MiB"
        rows.append(Row(name, "gateway RSS max MiB", None, rss, delta, "rss_mib", value=rss, digits=0))
        gateway_row("gateway CPU/chunk us", "cpu_us_per_chunk", "cpu_us_per_chunk")
    else:
        ttft = _sub(_at(gateway, "ttft_ms", "p50"), _at(direct, "ttft_ms", "p50"))
        row("TTFT p50 ms", ("ttft_ms", "p50"), _added(ttft), "ttft_added_p50_ms", value=ttft)
        row(
            "TTFT p99 ms",
            ("ttft_ms", "p99"),
            _added(_sub(_at(gateway, "ttft_ms", "p99"), _at(direct, "ttft_ms", "p99"))),
        )
        row(
            "last token p50 ms",
            ("ttlt_ms", "p50"),
            _added(_sub(_at(gateway, "ttlt_ms", "p50"), _at(direct, "ttlt_ms", "p50"))),
        )
        if point["params"]["token_delay"]:
            gap = _sub(_at(gateway, "gap_ms", "p99"), _at(direct, "gap_ms", "p99"))
            row("inter-token gap p99 ms", ("gap_ms", "p99"), _added(gap), "gap_added_p99_ms", value=gap)
            worst = _sub(_at(gateway, "max_gap_ms", "p99"), _at(direct, "max_gap_ms", "p99"))
            row("max gap per stream p99 ms", ("max_gap_ms", "p99"), _added(worst))
        row("tokens/s", ("tokens_per_s",), _ratio(_at(gateway, "tokens_per_s"), _at(direct, "tokens_per_s")), digits=0)
        gateway_row("gateway CPU/stream us", "cpu_us_per_request")
        gateway_row("gateway CPU/chunk us", "cpu_us_per_chunk", "cpu_us_per_chunk")

    gc = (gateway or {}).get("gc")
    if gc:
        total = sum(g["total_ms"] for g in gc.values())
        elapsed = _at(gateway, "elapsed_s")
        share = f"{total / 10 / elapsed:.1f}% of the run in GC" if elapsed else ""
        rows.append(Row(name, "gateway GC gen2 max pause ms", None, gc["gen2"]["max_ms"], share, digits=1))
        rows.append(Row(name, "gateway GC gen2 collections", None, gc["gen2"]["collections"], digits=0))
    row("core busy %", ("core_busy_pct",), digits=0)
    errors = _at(gateway, "errors")
    row("errors", ("errors",), key="errors", value=errors, digits=0)

    for r in rows:
        if r.key is not None:
            if r.value is None and r.key in ("rps", "cpu_us_per_request", "cpu_us_per_chunk", "errors"):
                r.value = r.gateway
            r.target = target_for(r.key, name)
            if r.target is not None:
                r.ok = r.target.check(r.value)
    return rows


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def render(rows: list[Row], notes: list[str] | None = None) -> str:
    header = ("figure", "direct", "gateway", "difference", "target", "")
    lines: list[tuple[str, ...]] = []
    current = None
    for r in rows:
        if r.point != current:
            current = r.point
            lines.append((r.point, "", "", "", "", ""))
        verdict = "" if r.target is None else ("PASS" if r.ok else ("FAIL" if r.ok is False else "n/a"))
        lines.append(
            (
                "  " + r.label,
                _number(r.direct, r.digits),
                _number(r.gateway, r.digits),
                r.delta,
                r.target.bound if r.target else "",
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    out = []

    def fmt(line: tuple[str, ...]) -> str:
        cells = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in (1, 2)]
        cells += [line[3].ljust(widths[3]), line[4].ljust(widths[4]), line[5]]
        return "  ".join(cells).rstrip()

    out.append(fmt(header))
    out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for line in lines:
        out.append(fmt(line) if line[1:] != ("",) * 5 else line[0])
    if notes:
        out.append("")
        out.extend(f"note: {n}" for n in notes)
    checked = [r for r in rows if r.target is not None]
    if checked:
        failed = [r for r in checked if r.ok is False]
        out.append("")
        out.append(f"targets: {len(checked) - len(failed)} of {len(checked)} figures pass")
        for r in failed:
            out.append(f"  FAIL {r.point}: {r.label} = {_number(r.value, 2)} ({r.target.text if r.target else ''})")
    return "\n".join(out)
