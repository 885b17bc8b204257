"""Instructions per relayed request, counted by valgrind: a figure that does not move with the machine.

    .venv/bin/python -m tests.bench.instructions [--stream] [--realistic [--without PARTS]] [--requests N]

CPU time on a shared machine moves by 10-20% between runs, more than most single changes to the hot
path are worth. Instructions executed do not: valgrind's callgrind counts them (user space only, so
the kernel's side of each syscall is left out, the same for every version of the code), and two runs
of the same code agree within about 1%.

The gateway app (the bench's bare configuration, or with ``--realistic`` its realistic one, with a
``redis-server`` of its own; ``--without history,limits`` leaves parts of it out) is driven
in-process, without a server or client sockets: 64 concurrent requests at a time, each handed to the
app as an ASGI call, forwarded over a real connection to the bench upstream, which runs in its own
process. The app is shut down at the end of each run, so the history it writes in the background is
counted too. The figure is the difference between two runs of the same warm-up and N and 3N
requests, over 2N: start-up and warm-up cancel out.
Both runs take about 5 minutes under valgrind with the default ``--requests 640``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import config, procs
from tests.bench.loadgen import BENCH_KEY
from tests.conftest import RedisServer

_CONCURRENCY = 64
_WARMUP_PER_WORKER = 10
_COLLECTED = re.compile(r"Collected : (\d+)")


def _scope(body: bytes, key: bool) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *([(b"authorization", b"Bearer " + BENCH_KEY.encode())] if key else []),
        ],
    }


async def _drive(base_url: str, requests: int, stream: bool, redis_url: str | None, without: list[str]) -> None:
    from gateway.app import create_app
    from gateway.settings import load_file

    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as directory:
        path = Path(directory) / "gateway.toml"
        path.write_text(config.realistic(base_url, redis_url, without) if redis_url else config.bare(base_url))
        settings = load_file(path)
    app = create_app(settings)
    body = b'{"model":"bench-model","messages":[{"role":"user","content":"hello"}]%s}' % (
        b',"stream":true' if stream else b""
    )

    async def one() -> None:
        delivered = False
        complete = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await complete.wait()
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body"):
                complete.set()

        await app(_scope(body, redis_url is not None) | {"state": {}}, receive, send)
        if status != 200:
            raise RuntimeError(f"the gateway answered {status}")

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan.put({"type": "lifespan.startup"})
    running = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, lifespan.get, answers.put))  # type: ignore[arg-type]
    started = await answers.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the gateway did not start: {started}")
    await asyncio.gather(*(worker(_WARMUP_PER_WORKER) for _ in range(_CONCURRENCY)))
    gc.collect()
    await asyncio.gather(*(worker(requests // _CONCURRENCY) for _ in range(_CONCURRENCY)))
    await lifespan.put({"type": "lifespan.shutdown"})
    await answers.get()
    await running


def _count(base_url: str, requests: int, stream: bool, redis_url: str | None, without: list[str]) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += ["-m", "tests.bench.instructions", "--drive", base_url, "--requests", str(requests)]
    command += ["--stream"] if stream else []
    command += ["--redis", redis_url] if redis_url else []
    command += ["--without", ",".join(without)] if without else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the run under valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=640, help="N: the runs make N and 3N requests")
    parser.add_argument("--stream", action="store_true", help="streamed requests (64 tokens each, no delay)")
    parser.add_argument("--realistic", action="store_true", help="history in Redis, an API key and rate limits")
    parser.add_argument(
        "--without", default="", help=f"with --realistic: parts left out, comma-separated ({', '.join(config.PARTS)})"
    )
    parser.add_argument("--drive", metavar="BASE_URL", help=argparse.SUPPRESS)  # one run, under valgrind
    parser.add_argument("--redis", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    without = [part for part in args.without.split(",") if part]
    if unknown := set(without) - set(config.PARTS):
        parser.error(f"--without: no such part {', '.join(sorted(unknown))}; the parts: {', '.join(config.PARTS)}")
    if args.drive:
        import uvloop

        gc.set_threshold(10_000, 20, 50)  # as gateway serve does
        uvloop.run(_drive(args.drive, args.requests, args.stream, args.redis, without))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    requests = args.requests // _CONCURRENCY * _CONCURRENCY
    gateway_cpus, rest = procs.cpu_plan()
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as logs:
        upstream, base_url = procs.upstream(Path(logs), rest)
        redis = RedisServer(Path(logs)).start() if args.realistic else None
        try:
            if redis is not None:
                procs.pin(redis.process.pid, rest)  # type: ignore[union-attr]
            if gateway_cpus:
                os.sched_setaffinity(0, gateway_cpus)
            redis_url = redis.url if redis is not None else None
            low = _count(base_url, requests, args.stream, redis_url, without)
            high = _count(base_url, 3 * requests, args.stream, redis_url, without)
        finally:
            upstream.stop()
            if redis is not None:
                redis.stop()
    kind = ("streamed (64 tokens)" if args.stream else "non-streamed") + (", realistic" if args.realistic else "")
    kind += f" without {', '.join(without)}" if args.realistic and without else ""
    print(f"{(high - low) / (2 * requests):,.0f} instructions a {kind} request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
