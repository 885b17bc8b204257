"""Instructions per relayed request, counted by valgrind: a figure that does not move with the machine.

    .venv/bin/python -m tests.bench.instructions [--stream [--tokens N] [--lockstep]] [--realistic [--without PARTS]]
        [--reference KIND] [--requests N]

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

``--tokens 1`` leaves mostly what a stream costs to open: what each of a burst of streams started
together waits for.

``--lockstep`` streams one at a time from an upstream in the same process that writes each event only
once the gateway has relayed the one before: every event comes in a read of its own, with its own
wake-up, as at a model's pace (the bench upstream writes a stream's events back to back, and one read
often carries several). Spacing the tokens in time instead would not keep the count steady: under
valgrind the gateway runs about 50 times slower, and how often events still arrive together moved
the count by 3% between runs. Lock-step counts agree within 0.1%. They include that upstream's own
work, an asyncio stream server's, the same for every version of the gateway: compare them with each
other only. ``--requests`` then defaults to 32.

``--reference asgi`` (or ``litestar-asgi``, ``litestar``) counts one of the minimal relays of
``tests/bench/reference.py`` in the gateway's place, driven the same way: what forwarding the bytes
costs before the gateway does any work of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from tests.bench.reference import RELAYS
from tests.bench.upstream import STREAM_HEAD, stream_events
from tests.conftest import RedisServer

_CONCURRENCY = 64
_TOKENS = 64  # the bench upstream's default
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


_MODELS_BODY = b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'
_MODELS = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(_MODELS_BODY),
    _MODELS_BODY,
)


async def _lockstep_upstream(tokens: int, relayed: asyncio.Event) -> tuple[asyncio.Server, str]:
    """A streaming upstream that writes each event once ``relayed`` says the one before reached the client."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):  # the gateway's health check, GET /v1/models
                    writer.write(_MODELS)
                    continue
                lines = head.lower().split(b"\r\n")
                length = next(int(line[15:]) for line in lines if line.startswith(b"content-length:"))
                await reader.readexactly(length)
                writer.write(STREAM_HEAD)
                for event in stream_events(tokens):
                    relayed.clear()
                    writer.write(event)
                    await relayed.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the run ended with the connection open: a reference relay has no shutdown to close it

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one run under valgrind drives: ``tokens`` per stream, or 0 for non-streamed requests."""

    tokens: int
    lockstep: bool
    redis_url: str | None
    without: list[str]
    reference: str | None

    def arguments(self) -> list[str]:
        """The command line of ``--drive`` that makes this run."""
        arguments = ["--stream", "--tokens", str(self.tokens)] if self.tokens else []
        arguments += ["--lockstep"] if self.lockstep else []
        arguments += ["--redis", self.redis_url] if self.redis_url else []
        arguments += ["--without", ",".join(self.without)] if self.without else []
        return arguments + (["--reference", self.reference] if self.reference else [])


def _app(base_url: str, run: _Run) -> Any:
    if run.reference is not None:
        return RELAYS[run.reference](base_url)
    from gateway.app import create_app
    from gateway.settings import load_file

    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as directory:
        path = Path(directory) / "gateway.toml"
        toml = config.realistic(base_url, run.redis_url, run.without) if run.redis_url else config.bare(base_url)
        path.write_text(toml)
        return create_app(load_file(path))


async def _drive(base_url: str, requests: int, run: _Run) -> None:
    tokens, lockstep, redis_url, reference = run.tokens, run.lockstep, run.redis_url, run.reference
    relayed = asyncio.Event()
    server = None
    if lockstep:
        server, base_url = await _lockstep_upstream(tokens, relayed)
    app = _app(base_url, run)
    body = b'{"model":"bench-model","messages":[{"role":"user","content":"hello"}]%s%s}' % (
        b',"stream":true' if tokens else b"",
        b',"max_tokens":%d' % tokens if tokens and tokens != _TOKENS else b"",
    )
    concurrency = 1 if lockstep else _CONCURRENCY

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
                return
            relayed.set()
            if not message.get("more_body"):
                complete.set()

        await app(_scope(body, redis_url is not None) | {"state": {}}, receive, send)
        if status != 200:
            raise RuntimeError(f"the gateway answered {status}")

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    # The reference relays run without a lifespan, as reference.py serves them.
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    running = None
    if reference is None:
        await lifespan.put({"type": "lifespan.startup"})
        running = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, lifespan.get, answers.put))
        started = await answers.get()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the gateway did not start: {started}")
    await asyncio.gather(*(worker(_WARMUP_PER_WORKER) for _ in range(concurrency)))
    gc.collect()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    if running is not None:
        await lifespan.put({"type": "lifespan.shutdown"})
        await answers.get()
        await running
    if server is not None:
        server.close()


def _count(base_url: str, requests: int, run: _Run) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += ["-m", "tests.bench.instructions", "--drive", base_url, "--requests", str(requests)]
    command += run.arguments()
    # One hash seed for every run: dict and set layouts, and so their probing, then repeat.
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the run under valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, help="N: the runs make N and 3N requests (default 640, lock-step 32)")
    parser.add_argument("--stream", action="store_true", help="streamed requests (64 tokens each, no delay)")
    parser.add_argument("--tokens", type=int, default=_TOKENS, help="with --stream: tokens a stream (default 64)")
    parser.add_argument(
        "--lockstep", action="store_true", help="with --stream: one read per event, one stream at a time (see above)"
    )
    parser.add_argument("--realistic", action="store_true", help="history in Redis, an API key and rate limits")
    parser.add_argument(
        "--without", default="", help=f"with --realistic: parts left out, comma-separated ({', '.join(config.PARTS)})"
    )
    parser.add_argument(
        "--reference",
        choices=tuple(RELAYS),
        help="a minimal relay of tests/bench/reference.py in the gateway's place",
    )
    parser.add_argument("--drive", metavar="BASE_URL", help=argparse.SUPPRESS)  # one run, under valgrind
    parser.add_argument("--redis", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    without = [part for part in args.without.split(",") if part]
    if unknown := set(without) - set(config.PARTS):
        parser.error(f"--without: no such part {', '.join(sorted(unknown))}; the parts: {', '.join(config.PARTS)}")
    if (args.lockstep or args.tokens != _TOKENS) and not args.stream:
        parser.error("--lockstep and --tokens are for streams: add --stream")
    if args.tokens < 1:
        parser.error("--tokens: at least 1")
    if args.reference and args.realistic:
        parser.error("--reference: a minimal relay has no realistic configuration")
    tokens = args.tokens if args.stream else 0
    if args.drive:
        import uvloop

        gc.set_threshold(10_000, 20, 50)  # as gateway serve does
        run = _Run(tokens, args.lockstep, args.redis, without, args.reference)
        uvloop.run(_drive(args.drive, args.requests, run))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    if args.requests is None:
        args.requests = 32 if args.lockstep else 640
    requests = args.requests if args.lockstep else args.requests // _CONCURRENCY * _CONCURRENCY
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
            run = _Run(tokens, args.lockstep, redis_url, without, args.reference)
            low = _count(base_url, requests, run)
            high = _count(base_url, 3 * requests, run)
        finally:
            upstream.stop()
            if redis is not None:
                redis.stop()
    kind = "non-streamed"
    if args.stream:
        kind = f"streamed ({tokens} token{'s' if tokens > 1 else ''}{', lock-step' if args.lockstep else ''})"
    kind += ", realistic" if args.realistic else ""
    kind += f" without {', '.join(without)}" if args.realistic and without else ""
    relay = f"the {args.reference} reference relay" if args.reference else "the gateway"
    print(f"{(high - low) / (2 * requests):,.0f} instructions a {kind} request through {relay}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
