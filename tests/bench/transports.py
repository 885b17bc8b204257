"""CPU per upstream call, by transport: what the gateway's own transport buys over the alternatives.

    .venv/bin/python -m tests.bench.transports [--calls N]

Starts the bench upstream on its own core and, in this process pinned to the other, sends the same
small chat request one at a time (so only the caller's CPU differs) through:

- ``gateway``: ``open_response`` over the gateway's transport, as the gateway sends every request;
- ``httpx-aiohttp``: ``open_response`` over httpx-aiohttp's ``AiohttpTransport``;
- ``httpx pool``: ``open_response`` over httpx's own ``AsyncHTTPTransport``;
- ``aiohttp``: aiohttp's ``ClientSession.post`` alone, no httpx (the floor of that library).

Each non-streamed call reads the whole answer; each streamed call reads a 64-token stream to its end.
Figures are process CPU time (user + system) per call, the best of three rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import uvloop
import yarl
from httpx_aiohttp import AiohttpTransport

from gateway.backends import Backend
from gateway.settings import BackendSettings
from gateway.transport import DEFAULT_LIMITS, Transport
from gateway.upstream import open_response
from tests.bench import procs

BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"stream":true}'


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Microseconds of this process's CPU a call: the best of three rounds, after a warm-up."""
    for _ in range(calls // 10):
        await call()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(calls):
            await call()
        best = min(best, (time.process_time() - started) / calls)
    return best * 1e6


async def _measure(base_url: str, calls: int) -> list[tuple[str, float, float]]:
    settings = msgspec.convert(
        {"name": "bench", "kind": "openai", "base_url": base_url, "models": ["bench-model"]}, BackendSettings
    )
    clients = {
        "gateway": httpx.AsyncClient(transport=Transport()),
        "httpx-aiohttp": httpx.AsyncClient(transport=AiohttpTransport(limits=DEFAULT_LIMITS)),
        "httpx pool": httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(limits=DEFAULT_LIMITS)),
    }
    timeout = httpx.Timeout(60)
    rows = []
    for name, client in clients.items():
        backend = Backend(settings, client)

        async def unary(backend: Backend = backend) -> None:
            response = await open_response(
                backend, "/chat/completions", BODY, request_id="bench", stream=False, timeout=timeout
            )
            await response.aread()
            await response.aclose()

        async def streamed(backend: Backend = backend) -> None:
            response = await open_response(
                backend, "/chat/completions", STREAM_BODY, request_id="bench", stream=True, timeout=timeout
            )
            async for _ in response.aiter_raw():
                pass
            await response.aclose()

        rows.append((name, await cpu_per_call(unary, calls), await cpu_per_call(streamed, calls // 4)))
        await client.aclose()

    url = yarl.URL(base_url + "/chat/completions")
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def raw_unary() -> None:
            async with session.post(url, data=BODY, headers=headers) as response:
                await response.read()

        async def raw_streamed() -> None:
            async with session.post(url, data=STREAM_BODY, headers=headers) as response:
                async for _ in response.content.iter_any():
                    pass

        rows.append(("aiohttp", await cpu_per_call(raw_unary, calls), await cpu_per_call(raw_streamed, calls // 4)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per round (streams: a quarter)")
    args = parser.parse_args()
    gateway_cpus, rest = procs.cpu_plan()
    with tempfile.TemporaryDirectory(prefix="bench-transports-") as logs:
        upstream, base_url = procs.upstream(Path(logs), rest)  # base_url ends in /v1
        try:
            if gateway_cpus:
                os.sched_setaffinity(0, gateway_cpus)
            rows = uvloop.run(_measure(base_url, args.calls))
        finally:
            upstream.stop()
    print(f"{'transport':16} {'CPU/call us':>12} {'CPU/stream us':>14}")
    for name, unary, streamed in rows:
        print(f"{name:16} {unary:12.1f} {streamed:14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
