"""CPU per Redis round trip of batched script calls, by how the batch is sent.

    .venv/bin/python -m tests.bench.redis_calls [--trips N] [--calls C]

Starts a ``redis-server`` on the other core and, in this process, sends N round trips one after
another, each carrying C ``EVALSHA`` calls of a script that returns at once (so only the caller's
CPU differs), through:

- ``pipeline``: a redis-py pipeline for each round trip, as :func:`gateway.scripts.run_scripts` sends
  the history's writes;
- ``pooled``: a connection taken from redis-py's pool for each round trip, the commands packed and
  the replies read on it directly;
- ``held``: :func:`gateway.scripts.run_scripts` on one connection kept for every round trip, as
  :class:`gateway.scripts.ScriptBatch` sends rate-limit calls.

Figures are process CPU time (user + system) per round trip, the best of three rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import uvloop
from redis.asyncio import Redis

from gateway.scripts import run_scripts
from tests.bench import procs
from tests.bench.transports import cpu_per_call
from tests.conftest import RedisServer


async def _main(url: str, trips: int, calls: int) -> None:
    client = Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=10)
    script = client.register_script("return 1")
    await client.script_load(script.script)
    batch = [(script, ["k"], ["a"])] * calls
    pool = client.connection_pool

    async def pooled() -> None:
        connection = await pool.get_connection()
        try:
            await run_scripts(client, batch, connection)
        finally:
            await pool.release(connection)

    held = await pool.get_connection()
    try:
        for name, trip in (
            ("pipeline", lambda: run_scripts(client, batch)),
            ("pooled", pooled),
            ("held", lambda: run_scripts(client, batch, held)),
        ):
            print(f"{name:10s} {await cpu_per_call(trip, trips):7.1f} us of CPU a round trip")
    finally:
        await pool.release(held)
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=5000, help="round trips a round")
    parser.add_argument("--calls", type=int, default=1, help="script calls a round trip")
    args = parser.parse_args()
    mine, rest = procs.cpu_plan()
    with tempfile.TemporaryDirectory(prefix="bench-redis-calls-") as logs:
        server = RedisServer(Path(logs)).start()
        try:
            procs.pin(server.process.pid, rest)  # type: ignore[union-attr]
            if mine:
                os.sched_setaffinity(0, mine)
            uvloop.run(_main(server.url, args.trips, args.calls))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
