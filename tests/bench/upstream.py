"""A fast fake OpenAI upstream for the benchmarks, run as its own process.

    python -m tests.bench.upstream --port P [--host 127.0.0.1]

The end-to-end tests' fake (tests/fake_upstream.py) is an ASGI app that records everything it sees;
here the upstream must cost next to nothing, so that what a benchmark measures is the gateway. It is a
raw asyncio ``Protocol`` on uvloop with a hand-rolled HTTP/1.1 keep-alive parser, and every byte it
answers with is built once at start-up.

Endpoints:

    GET  /health                 200 {}
    GET  /v1/models              one model, `bench-model`
    POST /v1/chat/completions    non-stream: a fixed small chat.completion
                                 stream: chunked SSE, a role chunk, N token chunks (N = max_tokens,
                                 else 64), a chunk with finish_reason, a usage chunk when
                                 stream_options.include_usage, then [DONE]

A request may set `bench_token_delay` (seconds) in its body: the first token goes out with the
headers, each next one that long after the previous one. Without it, every event of the stream is
written at once, one write per event (the bytes a fast model would send, back to back).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import msgspec
import uvloop

__all__ = ["MODEL", "main"]

MODEL = "bench-model"
DEFAULT_TOKENS = 64
_MAX_TOKENS = 100_000
_MAX_HEAD = 64 * 1024
_CREATED = 1_700_000_000
_ID = "chatcmpl-bench"

log = logging.getLogger("bench.upstream")


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Chat(msgspec.Struct):
    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    bench_token_delay: float | None = None
    stream_options: _StreamOptions | None = None


_decode_chat = msgspec.json.Decoder(_Chat).decode
_encode = msgspec.json.encode


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _chunk(data: bytes) -> bytes:
    """One SSE event, framed as one HTTP chunk."""
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _event(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    return _chunk(
        _encode(
            {
                "id": _ID,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )
    )


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": completion_tokens, "total_tokens": 8 + completion_tokens}


HEALTH = _response("200 OK", b"{}")
MODELS = _response(
    "200 OK",
    _encode({"object": "list", "data": [{"id": MODEL, "object": "model", "created": _CREATED, "owned_by": "bench"}]}),
)
NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = _response("400 Bad Request", b'{"error":{"message":"bad request","type":"invalid_request_error"}}')
COMPLETION = _response(
    "200 OK",
    _encode(
        {
            "id": _ID,
            "object": "chat.completion",
            "created": _CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(7),
        }
    ),
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
ROLE = _event({"role": "assistant", "content": ""})
FINISH = {"stop": _event({}, "stop"), "length": _event({}, "length")}
DONE = _chunk(b"[DONE]") + b"0\r\n\r\n"


class _Tokens:
    """Token chunks ``tok0 ``, ``tok1 ``, ..., built the first time a stream needs them."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._usage: dict[int, bytes] = {}

    def __getitem__(self, i: int) -> bytes:
        chunks = self._chunks
        while len(chunks) <= i:
            chunks.append(_event({"content": f"tok{len(chunks)} "}))
        return chunks[i]

    def usage(self, n: int) -> bytes:
        chunk = self._usage.get(n)
        if chunk is None:
            chunk = _chunk(
                _encode(
                    {
                        "id": _ID,
                        "object": "chat.completion.chunk",
                        "created": _CREATED,
                        "model": MODEL,
                        "choices": [],
                        "usage": _usage(n),
                    }
                )
            )
            self._usage[n] = chunk
        return chunk


_TOKENS = _Tokens()


def stream_events(n: int) -> list[bytes]:
    """A whole stream of ``n`` tokens as this upstream frames it (HTTP chunks), after its head."""
    return [ROLE, *(_TOKENS[i] for i in range(n)), FINISH["stop"], DONE]


class _Stream:
    """One streamed answer in progress, paced by the event loop's timers."""

    __slots__ = ("_conn", "_delay", "_finish", "_handle", "_i", "_loop", "_n", "_usage")

    def __init__(self, conn: _Connection, n: int, delay: float, finish: str, usage: bool) -> None:
        self._conn = conn
        self._n = n
        self._delay = delay
        self._finish = finish
        self._usage = usage
        self._i = 0
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        write = self._conn.transport.write
        write(STREAM_HEAD)
        write(ROLE)
        if self._delay <= 0:
            for i in range(self._n):
                write(_TOKENS[i])
            self._end()
            return
        self._tick()

    def _tick(self) -> None:
        self._handle = None
        if self._conn.closed:
            return
        self._conn.transport.write(_TOKENS[self._i])
        self._i += 1
        if self._i < self._n:
            self._handle = self._loop.call_later(self._delay, self._tick)
        else:
            self._end()

    def _end(self) -> None:
        write = self._conn.transport.write
        write(FINISH[self._finish])
        if self._usage:
            write(_TOKENS.usage(self._n))
        write(DONE)
        self._conn.response_done()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _Connection(asyncio.Protocol):
    """One client connection: requests are parsed and answered one at a time (keep-alive; a pipelined
    request waits in the buffer until the answer before it is complete)."""

    __slots__ = ("_buffer", "_close_after", "_stream", "busy", "closed", "transport")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.busy = False
        self.closed = False
        self._close_after = False
        self._stream: _Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.busy:
            self._process()

    def response_done(self) -> None:
        self.busy = False
        self._stream = None
        if self._close_after:
            self.transport.close()
        elif self._buffer:
            self._process()

    def _process(self) -> None:
        buffer = self._buffer
        while not self.busy and not self.closed:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self.transport.close()
                return
            head = bytes(buffer[:end]).lower()
            body_start = end + 4
            line_end = head.find(b"\r\n")
            method, _, rest = (head if line_end < 0 else head[:line_end]).partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            self._close_after = b"\r\nconnection: close" in head or rest.endswith(b"http/1.0")
            if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                taken = _dechunk(buffer, body_start)
                if taken is None:
                    return
                body, consumed = taken
            else:
                length = _content_length(head)
                if length is None:
                    self.transport.write(BAD_REQUEST)
                    self.transport.close()
                    return
                if len(buffer) < body_start + length:
                    return
                body = bytes(buffer[body_start : body_start + length])
                consumed = body_start + length
            del buffer[:consumed]
            self._answer(method, path, body)

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"post" and path == b"/v1/chat/completions":
            try:
                chat = _decode_chat(body)
            except msgspec.DecodeError:
                self._reply(BAD_REQUEST)
                return
            if not chat.stream:
                self._reply(COMPLETION)
                return
            limit = chat.max_tokens or chat.max_completion_tokens
            n = min(limit or DEFAULT_TOKENS, _MAX_TOKENS)
            usage = bool(chat.stream_options and chat.stream_options.include_usage)
            self.busy = True
            self._stream = _Stream(self, n, chat.bench_token_delay or 0.0, "length" if limit else "stop", usage)
            self._stream.start()
        elif method == b"get" and path == b"/health":
            self._reply(HEALTH)
        elif method == b"get" and path == b"/v1/models":
            self._reply(MODELS)
        else:
            self._reply(NOT_FOUND)

    def _reply(self, response: bytes) -> None:
        self.transport.write(response)
        if self._close_after:
            self.busy = True
            self.transport.close()


def _content_length(head: bytes) -> int | None:
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        return 0
    j = head.find(b"\r\n", i + 2)
    try:
        return int(head[i + 17 : j if j >= 0 else None])
    except ValueError:
        return None


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at ``start``: (body, bytes consumed), or None if incomplete."""
    parts = []
    pos = start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buffer[pos:eol]).split(b";")[0], 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)
            if buffer[eol : eol + 4] == b"\r\n\r\n":
                return b"".join(parts), eol + 4
            if trailer_end < 0:
                return None
            return b"".join(parts), trailer_end + 4
        if len(buffer) < eol + 2 + size + 2:
            return None
        parts.append(bytes(buffer[eol + 2 : eol + 2 + size]))
        pos = eol + 2 + size + 2


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("bench upstream listening on http://%s:%d", host, port)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
