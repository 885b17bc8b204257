"""Prometheus metrics, and ``GET /metrics``.

Two kinds of figures. Those of requests (counts, durations, time to first token, tokens...) are
noted once per request, when it is complete, by :mod:`gateway.observe`, and folded into the metrics
in batches, at the latest when ``/metrics`` is scraped: nothing runs per stream chunk beyond what
:class:`~gateway.reply.Reply` records anyway. Those of the app's state (backend health, the history
queue, Redis errors) are read from ``app.state`` when ``/metrics`` is scraped.

With ``--workers`` > 1 each worker is a process of its own, and prometheus-client keeps every value in
a file per process under ``PROMETHEUS_MULTIPROC_DIR`` (the CLI makes one), which ``/metrics`` adds up,
whichever worker answers (its "multiprocess mode"). That mode has no custom collectors, so the state
figures are written into ordinary metrics by :meth:`Metrics.sample` instead, and the requests each
worker has noted are folded there too: at each scrape, and by every worker once a second so the
scrape sees the other workers too.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import os
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.reply import Reply

__all__ = ["Metrics", "observe_all", "scrape", "worker_metrics"]

# Distinct models and keys kept as label values; past that they count as "other". A `*` route passes
# any model name the client makes up, and a series per made-up name would grow without bound.
_MAX_LABEL_VALUES = 500
_SAMPLE_INTERVAL = 1.0
# Requests noted before they are folded into the metrics without a scrape: enough to share each
# update among many, few enough that a fold (2-4 us a request) holds the loop under a millisecond.
_FOLD_EVERY = 256

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    """Every metric the gateway exports, registered in ``registry``; with ``registry=None`` and a
    ``multiprocess_dir``, kept in that directory's files for :class:`MultiProcessCollector`."""

    def __init__(self, registry: CollectorRegistry | None, *, multiprocess_dir: str | None = None) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        r = registry
        self.requests = Counter(
            "gateway_requests_total",
            "HTTP requests answered, by route template, model, backend and status.",
            ["route", "model", "backend", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "From the request's arrival to its response's last byte.",
            ["route", "model", "backend"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From sending the request upstream to the first event relayed (the whole body, non-streamed).",
            ["model", "backend"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "gateway_inter_token_seconds",
            "Between two consecutive stream events relayed.",
            ["model"],
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens_total", "Tokens the upstreams reported, by key.", ["model", "key", "type"], registry=r
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being answered.", registry=r, multiprocess_mode="livesum"
        )
        self.open_streams = Gauge(
            "gateway_open_streams", "Event streams being relayed.", registry=r, multiprocess_mode="livesum"
        )
        self.retries = Counter(
            "gateway_retries_total", "Upstream attempts beyond each request's first.", ["model"], registry=r
        )
        self.ratelimit_rejections = Counter(
            "gateway_ratelimit_rejections_total", "Requests refused by a key's rate limits.", ["key"], registry=r
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "A request's duration minus the time spent waiting on the upstream: the gateway's own.",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        # Read from app.state by sample().
        self.backend_healthy = Gauge(
            "gateway_backend_healthy",
            "1 while a backend takes traffic, 0 while it is down (discovery or health checks failed) or ejected.",
            ["backend"],
            registry=r,
            # With several workers: 0 when any worker has it out of rotation.
            multiprocess_mode="livemin",
        )
        self.backend_ejections = Counter(
            "gateway_backend_ejections_total", "Times a backend was taken out of rotation.", ["backend"], registry=r
        )
        self.history_queue = Gauge(
            "gateway_history_queue", "History records waiting to be written.", registry=r, multiprocess_mode="livesum"
        )
        self.history_dropped = Counter(
            "gateway_history_dropped_total", "History records dropped (queue full, or rejected).", registry=r
        )
        self.redis_errors = Counter(
            "gateway_redis_errors_total",
            "Redis operations that failed, by what needed them.",
            ["component"],
            registry=r,
        )
        # In one process, counted as plain integers and written into their gauges by sample(): a
        # gauge's inc() and dec() take a lock each, four times a request. With several workers each
        # worker's gauge is a file the others' scrapes read, kept live so that the sum is exact.
        self.requests_in_flight = 0
        self.streams_open = 0
        self._live = multiprocess_dir is not None
        self._counted: dict[tuple[int, tuple[str, ...]], float] = {}
        self._label_values: dict[str, set[str]] = {"model": set(), "key": set()}
        # Children by label values: prometheus-client's labels() costs microseconds a call.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._done: list[tuple[Any, ...]] = []

    # -- per request ----------------------------------------------------------------------------

    def request_done(
        self,
        route: str,
        status: int,
        duration: float,
        *,
        model: str,
        backend: str,
        key: str,
        reply: Reply | None,
    ) -> None:
        """One complete request (for a stream: the stream has ended). Noted here and folded into the
        metrics by :meth:`fold`, at each scrape or every ``_FOLD_EVERY`` requests: prometheus-client
        takes a lock and checks the metric for each update, seven or more a request, where a fold
        makes one update per series for the whole batch."""
        if reply is None:
            first_token, upstream_time, gaps, usage, retries = None, 0.0, (), None, 0
        else:
            first_token, upstream_time, usage, retries = (
                reply.first_token,
                reply.upstream_time,
                reply.usage,
                reply.retries,
            )
            # A copy: a resumable generation goes on adding to its reply after its client left.
            gaps = reply.gaps[:] if reply.gaps else ()
        self._done.append(
            (route, status, duration, model, backend, key, first_token, upstream_time, gaps, usage, retries)
        )
        if len(self._done) >= _FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Add the requests noted since the last fold to the metrics."""
        done, self._done = self._done, []
        if not done:
            return
        requests: collections.Counter[tuple[str, ...]] = collections.Counter()
        durations: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        ttfts: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        gaps: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        tokens: collections.Counter[tuple[str, ...]] = collections.Counter()
        retries: collections.Counter[tuple[str, ...]] = collections.Counter()
        overheads: list[float] = []
        for route, status, duration, model, backend, key, first_token, upstream_time, these_gaps, usage, tries in done:
            model = self._bounded("model", model)
            requests[route, model, backend, str(status)] += 1
            durations[route, model, backend].append(duration)
            if first_token is not None:
                ttfts[model, backend].append(first_token)
                overheads.append(max(0.0, duration - upstream_time))
            if these_gaps:
                gaps[(model,)].extend(these_gaps)
            if usage is not None:
                key = self._bounded("key", key)
                tokens[model, key, "prompt"] += usage.prompt_tokens
                tokens[model, key, "completion"] += usage.completion_tokens
            if tries:
                retries[(model,)] += tries
        for labels, count in requests.items():
            self._child(self.requests, *labels).inc(count)
        for metric, observed in ((self.duration, durations), (self.ttft, ttfts), (self.inter_token, gaps)):
            for labels, values in observed.items():
                observe_all(self._child(metric, *labels), values)
        if overheads:
            observe_all(self.overhead, overheads)
        for labels, count in tokens.items():
            self._child(self.tokens, *labels).inc(count)
        for labels, count in retries.items():
            self._child(self.retries, *labels).inc(count)

    def request_started(self) -> None:
        self.requests_in_flight += 1
        if self._live:
            self.in_flight.inc()

    def request_ended(self) -> None:
        self.requests_in_flight -= 1
        if self._live:
            self.in_flight.dec()

    def stream_opened(self) -> None:
        self.streams_open += 1
        if self._live:
            self.open_streams.inc()

    def stream_closed(self) -> None:
        self.streams_open -= 1
        if self._live:
            self.open_streams.dec()

    def rate_limited(self, key: str) -> None:
        self._child(self.ratelimit_rejections, self._bounded("key", key)).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    def _bounded(self, label: str, value: str) -> str:
        seen = self._label_values[label]
        if value in seen or not value:
            return value
        if len(seen) >= _MAX_LABEL_VALUES:
            return "other"
        seen.add(value)
        return value

    # -- read from the app's state --------------------------------------------------------------

    def sample(self, state: State) -> None:
        """Write what ``app.state`` says now into the state metrics, and fold the requests done."""
        self.fold()
        if not self._live:
            self.in_flight.set(self.requests_in_flight)
            self.open_streams.set(self.streams_open)
        for backend in state.backends:
            healthy = backend.up and getattr(backend, "state", "up") != "ejected"
            self.backend_healthy.labels(backend.name).set(1 if healthy else 0)
            self._count(self.backend_ejections, (backend.name,), getattr(backend, "ejections", 0))
        history = getattr(state, "history", None)
        if history is not None:
            self.history_queue.set(history.queued)
            self._count(self.history_dropped, (), history.dropped)
        errors = {
            "history": getattr(history, "store_errors", 0),
            "limits": getattr(getattr(state, "limiter", None), "redis_errors", 0),
            "auth": getattr(getattr(getattr(state, "auth", None), "store", None), "redis_errors", 0),
        }
        for component, total in errors.items():
            self._count(self.redis_errors, (component,), total)

    def _count(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        """Bring ``counter`` up to ``total``, a running count kept by the state: prometheus-client's
        counters only go up by increments, which is what lets the workers' files be added up."""
        child = counter.labels(*labels) if labels else counter
        key = (id(counter), labels)
        delta = total - self._counted.get(key, 0)
        if delta > 0:
            child.inc(delta)
            self._counted[key] = total

    async def sample_forever(self, state: State) -> None:
        """With several workers: each one publishes its state figures for whichever answers scrapes."""
        while True:
            self.sample(state)
            await asyncio.sleep(_SAMPLE_INTERVAL)

    def collector(self) -> Any:
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return registry

    def process_exited(self) -> None:
        """Fold the last requests into this process's files, and drop its live gauges (in-flight,
        streams, health, queue) from the sums."""
        self.fold()
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)


def observe_all(histogram: Any, values: list[float]) -> None:
    """What ``histogram.observe(value)`` for each value does, for a fraction of the cost: a long
    stream has a gap per token, and observe() takes a lock and walks the buckets each time, where this
    counts them per bucket first (prometheus-client has no bulk observe; tests/test_metrics.py checks
    this against observe()). Counted on the values sorted, a bisection per bucket bound: a fold
    brings thousands of values, and sorting them is C where a bisection per value is a Python loop."""
    ordered = sorted(values)
    below = 0
    for bucket, bound in enumerate(histogram._upper_bounds):
        # observe() puts a value in the first bucket whose bound is at least the value.
        upto = bisect.bisect_right(ordered, bound)
        if upto > below:
            histogram._buckets[bucket].inc(upto - below)
            below = upto
            if below == len(ordered):
                break
    histogram._sum.inc(sum(ordered))


_worker_metrics: Metrics | None = None


def worker_metrics(directory: str) -> Metrics:
    """This worker process's metrics in multiprocess mode. One set per process, made once: the values
    live in the process's files, and a second set would overwrite the first's."""
    global _worker_metrics
    if _worker_metrics is None:
        _worker_metrics = Metrics(None, multiprocess_dir=directory)
    return _worker_metrics


@get("/metrics", sync_to_thread=False)
def scrape(request: Request, state: State) -> Response[bytes]:
    """Prometheus' scrape endpoint: the text format, or OpenMetrics when the scraper asks for it."""
    metrics: Metrics = state.metrics
    metrics.sample(state)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    if content_type.startswith("text/"):
        content_type = content_type.replace("; charset=utf-8", "")  # Litestar adds it to text/* itself
    return Response(encode(metrics.collector()), media_type=content_type)
