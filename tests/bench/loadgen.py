"""A cheap load generator for chat completions, run as its own process; prints one JSON object.

    python -m tests.bench.loadgen --url http://127.0.0.1:P/v1/chat/completions --concurrency 64 \\
        [--duration 5 --warmup 1 | --requests 500] [--stream --max-tokens 64 --token-delay 0.005]

Raw asyncio on uvloop with a hand-written HTTP/1.1 client: one persistent connection per concurrent
worker, each sending the same pre-built request bytes again as soon as the previous answer ended. A
Python client built on a general HTTP library spends more CPU per request than the gateway does, and
would measure itself.

With ``--duration``, a request counts when it ends inside the measured window (after ``--warmup``);
requests still running at the end are waited for but not counted, so the rate is completions per
second of steady state. With ``--requests``, exactly that many requests are made and all count.

Figures (times in ms): latency (request sent to last byte), and for streams ttft (first `data:` event
with non-empty content), ttlt (last such event), gap (between two consecutive content events, pooled
over all streams; events read in one socket read are 0 apart), max_gap (each stream's largest gap),
tokens (content events), events (every SSE event, [DONE] included), max_open (streams whose headers
had arrived and whose end had not, at most at once).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import uvloop

__all__ = ["main", "percentiles", "request_bytes"]

_clock = time.perf_counter
_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_ERROR_EVENT = b'data: {"error"'
_DONE = b"data: [DONE]"

BENCH_KEY = "sk-bench-key-0123456789"


def request_bytes(
    host: str,
    port: int,
    path: str,
    *,
    model: str,
    stream: bool,
    max_tokens: int,
    token_delay: float,
    include_usage: bool,
) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    if stream:
        body["stream"] = True
        body["max_tokens"] = max_tokens
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        if token_delay > 0:
            body["bench_token_delay"] = token_delay
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        # The realistic run's API key; an open gateway and the upstream ignore it.
        f"authorization: Bearer {BENCH_KEY}\r\n"
        f"accept: {'text/event-stream' if stream else 'application/json'}\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class _Result:
    """What one request produced; times are ``perf_counter`` seconds."""

    __slots__ = ("done", "end", "error", "events", "first", "gaps", "last", "max_gap", "start", "tokens")

    def __init__(self, start: float) -> None:
        self.start = start
        self.end = 0.0
        self.first = 0.0
        self.last = 0.0
        self.tokens = 0
        self.events = 0
        self.max_gap = 0.0
        self.gaps: list[float] = []
        self.done = False
        self.error: str | None = None


class _Client(asyncio.Protocol):
    """One keep-alive connection and the response being read on it."""

    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._future: asyncio.Future[_Result] | None = None
        self._result: _Result | None = None
        self._buffer = b""
        self._state = 0  # 0 head, 1 body by length, 2 chunked body, 3 body until close
        self._length = 0
        self._status = 0
        self._close_after = False
        self._sse = b""
        self._open = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._future is not None:
            if self._state == 3:
                self._body(self._buffer, _clock())
                self._finish()
            else:
                self._fail("disconnect")

    def data_received(self, data: bytes) -> None:
        now = _clock()
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buffer and self._future is not None:
            if self._state == 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    self._buffer = buffer
                    return
                self._head(buffer[:end])
                buffer = buffer[end + 4 :]
                if self._state == 1 and self._length == 0:
                    self._finish()
            elif self._state == 1:
                if len(buffer) < self._length:
                    self._buffer = buffer
                    return
                self._body(buffer[: self._length], now)
                buffer = buffer[self._length :]
                self._finish()
            elif self._state == 2:
                buffer = self._chunks(buffer, now)
                if self._future is not None:  # the body goes on in the next read
                    break
            else:
                self._body(buffer, now)
                buffer = b""
        if buffer:
            self._buffer = buffer

    # -- one response --------------------------------------------------------------------------

    def request(self, payload: bytes, start: float) -> asyncio.Future[_Result]:
        assert self.transport is not None
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._future = future
        self._result = _Result(start)
        self._state = 0
        self._sse = b""
        self.transport.write(payload)
        return future

    def timed_out(self, now: float, timeout: float) -> bool:
        result = self._result
        return self._future is not None and result is not None and now - result.start > timeout

    def _head(self, head: bytes) -> None:
        try:
            self._status = int(head[9:12])
        except ValueError:
            self._status = 0
        lower = head.lower()
        self._close_after = b"\r\nconnection: close" in lower
        if b"\r\ntransfer-encoding:" in lower and b"chunked" in lower:
            self._state = 2
        else:
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                self._length = int(lower[i + 17 : j if j >= 0 else None])
                self._state = 1
            else:
                self._state = 3
        if self._status == 200 and self.stats.stream:
            self._open = True
            self.stats.opened()

    def _chunks(self, buffer: bytes, now: float) -> bytes:
        """Decode as many chunks of a chunked body as ``buffer`` holds; returns what is left."""
        pos = 0
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                return buffer[pos:]
            size = int(buffer[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if len(buffer) < eol + 4:
                    return buffer[pos:]
                self._finish()
                return buffer[eol + 4 :]
            size_end = eol + 2 + size
            if len(buffer) < size_end + 2:
                return buffer[pos:]
            self._body(buffer[eol + 2 : size_end], now)
            pos = size_end + 2

    def _body(self, data: bytes, now: float) -> None:
        if not self.stats.stream or self._status != 200:
            return
        sse = self._sse + data if self._sse else data
        cut = sse.rfind(b"\n\n")
        if cut < 0:
            self._sse = sse
            return
        cut += 2
        complete, self._sse = sse[:cut], sse[cut:]
        result = self._result
        assert result is not None
        result.events += complete.count(b"\n\n")
        tokens = complete.count(_CONTENT) - complete.count(_EMPTY_CONTENT)
        if tokens > 0:
            if result.tokens == 0:
                result.first = now
            else:
                gap = now - result.last
                result.gaps.append(gap)
                if gap > result.max_gap:
                    result.max_gap = gap
            if tokens > 1:
                result.gaps.extend([0.0] * (tokens - 1))
            result.tokens += tokens
            result.last = now
        if _ERROR_EVENT in complete:
            result.error = "error_event"
        if _DONE in complete:
            result.done = True

    def _finish(self) -> None:
        future, result = self._future, self._result
        self._future = self._result = None
        self._state = 0
        if self._open:
            self._open = False
            self.stats.closed()
        if future is None or result is None:
            return
        result.end = _clock()
        if self._status != 200:
            result.error = f"status_{self._status}"
        elif self.stats.stream and not result.done and result.error is None:
            result.error = "no_done"
        if self._close_after and self.transport is not None:
            self.transport.close()
            self.lost = True
        if not future.done():
            future.set_result(result)

    def _fail(self, kind: str) -> None:
        future, result = self._future, self._result
        self._future = self._result = None
        if self._open:
            self._open = False
            self.stats.closed()
        if future is not None and not future.done():
            assert result is not None
            result.end = _clock()
            result.error = kind
            future.set_result(result)

    def abort(self, kind: str) -> None:
        self._fail(kind)
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


class _Stats:
    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.window = (0.0, math.inf)
        self.latency = array("d")
        self.ttft = array("d")
        self.ttlt = array("d")
        self.gaps = array("d")
        self.max_gaps = array("d")
        self.tokens = 0
        self.completed = 0
        self.completed_total = 0
        self.events_total = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.max_open = 0

    def opened(self) -> None:
        self.open += 1
        if self.open > self.max_open:
            self.max_open = self.open

    def closed(self) -> None:
        self.open -= 1

    def add(self, result: _Result) -> None:
        self.events_total += result.events
        if result.error is not None:
            self.errors[result.error] += 1
            return
        self.completed_total += 1
        start, end = self.window
        if not start <= result.end <= end:
            return
        self.completed += 1
        self.latency.append(result.end - result.start)
        if self.stream and result.tokens:
            self.tokens += result.tokens
            self.ttft.append(result.first - result.start)
            self.ttlt.append(result.last - result.start)
            self.gaps.extend(result.gaps)
            self.max_gaps.append(result.max_gap)


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/max/mean (nearest rank), multiplied by ``scale`` (seconds to ms by default)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * scale, 4)

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[-1] * scale, 4),
        "mean": round(sum(ordered) / n * scale, 4),
    }


async def _connect(host: str, port: int, stats: _Stats) -> _Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: _Client(stats), host, port)
    return client


async def _worker(
    host: str,
    port: int,
    payload: bytes,
    stats: _Stats,
    clients: list[_Client],
    start: asyncio.Event,
    end_at: list[float],
    budget: list[int] | None,
) -> None:
    client = await _connect(host, port, stats)
    clients.append(client)
    await start.wait()
    while True:
        now = _clock()
        if now >= end_at[0]:
            return
        if budget is not None:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        if client.lost:
            clients.remove(client)
            try:
                client = await _connect(host, port, stats)
            except OSError:
                stats.errors["connect"] += 1
                await asyncio.sleep(0.05)
                continue
            clients.append(client)
            now = _clock()
        stats.add(await client.request(payload, now))


async def _watchdog(clients: list[_Client], timeout: float) -> None:
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        now = _clock()
        for client in list(clients):
            if client.timed_out(now, timeout):
                client.abort("timeout")


async def run(
    url: str,
    *,
    concurrency: int,
    duration: float | None,
    warmup: float,
    requests: int | None,
    stream: bool,
    max_tokens: int,
    token_delay: float,
    include_usage: bool,
    model: str,
    timeout: float,
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    payload = request_bytes(
        host,
        port,
        path,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        token_delay=token_delay,
        include_usage=include_usage,
    )
    stats = _Stats(stream)
    clients: list[_Client] = []
    start = asyncio.Event()
    end_at = [math.inf]
    budget = [requests] if requests is not None else None
    workers = [
        asyncio.ensure_future(_worker(host, port, payload, stats, clients, start, end_at, budget))
        for _ in range(concurrency)
    ]
    # Connect everything first: connection set-up is not what is measured.
    while len(clients) < concurrency:
        failed = [w for w in workers if w.done() and w.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        await asyncio.sleep(0.005)
    watchdog = asyncio.ensure_future(_watchdog(clients, timeout))
    cpu0 = _cpu()
    t0 = _clock()
    if duration is not None:
        stats.window = (t0 + warmup, t0 + warmup + duration)
        end_at[0] = stats.window[1]
    start.set()
    await asyncio.gather(*workers)
    t1 = _clock()
    watchdog.cancel()
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    if duration is not None:
        window = duration
    else:
        window = t1 - t0
    result: dict[str, Any] = {
        "url": url,
        "stream": stream,
        "concurrency": concurrency,
        "window_s": round(window, 4),
        "warmup_s": warmup if duration is not None else 0.0,
        "elapsed_s": round(t1 - t0, 4),
        "completed": stats.completed,
        "completed_total": stats.completed_total,
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "rps": round(stats.completed / window, 2) if window > 0 else 0.0,
        "latency_ms": percentiles(stats.latency),
        "loadgen_cpu_s": round(_cpu() - cpu0, 3),
    }
    if stream:
        result |= {
            "max_tokens": max_tokens,
            "token_delay_s": token_delay,
            "tokens": stats.tokens,
            "tokens_per_s": round(stats.tokens / window, 1) if window > 0 else 0.0,
            "events_total": stats.events_total,
            "max_open": stats.max_open,
            "ttft_ms": percentiles(stats.ttft),
            "ttlt_ms": percentiles(stats.ttlt),
            "gap_ms": percentiles(stats.gaps),
            "max_gap_ms": percentiles(stats.max_gaps),
        }
    return result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/v1/chat/completions")
    parser.add_argument("--concurrency", type=int, default=1, help="workers, one connection each")
    how_long = parser.add_mutually_exclusive_group()
    how_long.add_argument("--duration", type=float, help="seconds measured after the warm-up (default 5)")
    how_long.add_argument("--requests", type=int, help="make exactly this many requests instead")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured, with --duration")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens (bench_token_delay)")
    parser.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as failed")
    args = parser.parse_args(argv)
    duration = args.duration if args.requests is None and args.duration is not None else None
    if args.requests is None and duration is None:
        duration = 5.0
    result = uvloop.run(
        run(
            args.url,
            concurrency=args.concurrency,
            duration=duration,
            warmup=args.warmup,
            requests=args.requests,
            stream=args.stream,
            max_tokens=args.max_tokens,
            token_delay=args.token_delay,
            include_usage=not args.no_usage,
            model=args.model,
            timeout=args.timeout,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
