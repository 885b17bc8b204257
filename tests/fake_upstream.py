"""A fake OpenAI-compatible upstream, run as its own process by the end-to-end tests.

    python tests/fake_upstream.py --port P [--host 127.0.0.1] [--models m1,m2] [--name NAME]

It answers deterministically and cheaply, and records what it receives so a test can assert on the
exact bytes the gateway forwarded.

Endpoints:

    GET  /health                  200 {}  (vLLM answers its health check this way)
    GET  /v1/models               the --models list, owned_by NAME
    POST /v1/chat/completions     stream and non-stream
    POST /v1/completions          legacy completions, stream and non-stream
    POST /v1/embeddings           8 floats per input, derived from the input's hash
    POST /v1/responses            non-stream only
    GET  /_control/requests       every request received (control ones excepted), in order
    DELETE /_control/requests     forget the requests and the events
    GET  /_control/events         started / completed / disconnect, per response

The reply text is "tok0 tok1 ...": `max_tokens` (or `max_completion_tokens`, `max_output_tokens`) tokens
with finish_reason "length", else 5 tokens with "stop".

A request body may steer the fake with extra fields, which the gateway must forward untouched:

    fake_scenario      one of SCENARIOS (absent: a normal answer)
    fake_delay         seconds to wait before answering (before the response headers); for
                       slow_first_token, between the stream's headers and its first chunk
    fake_token_delay   seconds between streamed chunks

Scenarios:

    error_400 / error_429 / error_500   the status with an OpenAI error body (429 adds retry-after: 1)
    error_plain_500     500 with a text/plain "Internal Server Error", not OpenAI-shaped
    slow_first_token    stream: headers at once, first chunk after fake_delay
    hang                never answer (until the client goes away)
    drop_mid_stream     2 chunks, then the connection is cut inside the chunked body
    garbage_mid_stream  2 chunks, a `data: this is not json` event, then the normal end
    truncate            the token chunks only: no finish_reason, no usage, no [DONE]; a clean end
    inband_error        2 chunks, then `data: {"error": {...}}`, then a clean end

The stream scenarios have non-stream counterparts so a test can ask for either shape: drop_mid_stream
sends half the body announced by content-length and cuts the connection; garbage_mid_stream answers 200
with a body that is not JSON; truncate answers the first half of the JSON body, cleanly ended;
inband_error answers 200 with the error object as the body.

An event is recorded for every response to a model endpoint: `started` when a stream's headers went
out, `completed` when the whole response was sent, `disconnect` when the client left first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SCENARIOS", "FakeUpstream", "main"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SCENARIOS = frozenset(
    {
        "error_400",
        "error_429",
        "error_500",
        "error_plain_500",
        "slow_first_token",
        "hang",
        "drop_mid_stream",
        "garbage_mid_stream",
        "truncate",
        "inband_error",
    }
)

CREATED = 1700000000
DEFAULT_TOKENS = 5
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"[DONE]"
_GARBAGE = b"this is not json"
_INBAND_ERROR = {
    "error": {
        "message": "fake upstream failure",
        "type": "server_error",
        "param": None,
        "code": "fake_inband",
    }
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_ERRORS: dict[str, tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]] = {
    "error_400": (400, _error("fake bad request", "invalid_request_error", "fake_code", "messages"), []),
    "error_429": (
        429,
        _error("fake rate limit", "rate_limit_error", "rate_limit_exceeded"),
        [(b"retry-after", b"1")],
    ),
    "error_500": (500, _error("fake server error", "server_error"), []),
}


class _DropConnection(Exception):
    """Raised after the response started: uvicorn then closes the socket mid-body."""


class _BadRequest(Exception):
    pass


class _Exchange:
    """One request/response pair: sends that notice a client which went away.

    uvicorn's `send` returns silently once the client disconnected, so the disconnect is learnt from a
    task awaiting `receive()` (the ASGI spec's `http.disconnect`), and from `send` raising on servers that
    do raise.
    """

    def __init__(self, send: Send, receive: Receive) -> None:
        self._send = send
        self.gone = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    def close(self) -> None:
        self._watcher.cancel()

    async def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False if the client disconnected meanwhile."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.gone.wait(), seconds)
            except TimeoutError:
                pass
        return not self.gone.is_set()

    async def send(self, message: Message) -> bool:
        if self.gone.is_set():
            return False
        try:
            await self._send(message)
        except OSError:
            self.gone.set()
        return not self.gone.is_set()

    async def start(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        return await self.send({"type": "http.response.start", "status": status, "headers": list(headers)})

    async def body(self, data: bytes, *, more: bool = False) -> bool:
        return await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, obj: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> bool:
        data = _dumps(obj)
        length = (b"content-length", str(len(data)).encode())
        return await self.start(status, [_JSON, length, *headers]) and await self.body(data)


class FakeUpstream:
    """The ASGI application. State lives on the instance, so importing the module starts nothing."""

    def __init__(self, models: Sequence[str] = ("fake-model",), name: str = "fake") -> None:
        self.models = list(models)
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._name_header = (b"x-fake-upstream", name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        headers = _headers(scope)
        ex = _Exchange(send, receive)
        try:
            if path.startswith("/_control/"):
                await self._control(ex, method, path)
                return
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "headers": headers,
                    "body_b64": base64.b64encode(body).decode(),
                    "body": _parse(body),
                }
            )
            await self._serve(ex, method, path, body, headers.get("x-request-id"))
        finally:
            ex.close()

    async def _control(self, ex: _Exchange, method: str, path: str) -> None:
        if path == "/_control/requests" and method == "GET":
            await ex.json(200, self.requests)
        elif path == "/_control/requests" and method == "DELETE":
            self.requests.clear()
            self.events.clear()
            await ex.json(200, {})
        elif path == "/_control/events" and method == "GET":
            await ex.json(200, self.events)
        else:
            await ex.json(404, _error(f"no control endpoint {method} {path}", "invalid_request_error"))

    async def _serve(self, ex: _Exchange, method: str, path: str, raw: bytes, request_id: str | None) -> None:
        if method == "GET" and path == "/health":
            await ex.json(200, {}, [self._name_header])
            return
        if method == "GET" and path == "/v1/models":
            data = [{"id": m, "object": "model", "created": CREATED, "owned_by": self.name} for m in self.models]
            await ex.json(200, {"object": "list", "data": data}, [self._name_header])
            return
        endpoint = _ENDPOINTS.get(path)
        if endpoint is None:
            await ex.json(404, _error(f"unknown path {path}", "invalid_request_error", "not_found"))
            return
        if method != "POST":
            await ex.json(405, _error(f"{method} not allowed", "invalid_request_error"))
            return
        try:
            body = _parse(raw)
            if not isinstance(body, dict):
                raise _BadRequest("body is not a JSON object")
            scenario = body.get("fake_scenario")
            if scenario is not None and scenario not in SCENARIOS:
                raise _BadRequest(f"unknown fake_scenario {scenario!r}")
            delay = float(body.get("fake_delay") or 0)
            token_delay = float(body.get("fake_token_delay") or 0)
        except (_BadRequest, TypeError, ValueError) as exc:
            await ex.json(400, _error(f"fake upstream: {exc}", "invalid_request_error"))
            return
        call = _Call(self, ex, path, body, scenario, request_id)
        await call.run(endpoint, delay, token_delay)

    def record(self, type_: str, request_id: str | None, path: str) -> None:
        self.events.append({"type": type_, "request_id": request_id, "path": path})


class _Call:
    """One call to a model endpoint, with its scenario."""

    def __init__(
        self,
        app: FakeUpstream,
        ex: _Exchange,
        path: str,
        body: dict[str, Any],
        scenario: str | None,
        request_id: str | None,
    ) -> None:
        self.app, self.ex, self.path, self.body = app, ex, path, body
        self.scenario, self.request_id = scenario, request_id
        self.headers = [app._name_header]

    def record(self, type_: str) -> None:
        self.app.record(type_, self.request_id, self.path)

    async def run(self, endpoint: _Endpoint, delay: float, token_delay: float) -> None:
        scenario, stream = self.scenario, bool(self.body.get("stream"))
        if scenario == "hang":
            delay = 3600.0
        if scenario != "slow_first_token" or not stream:
            if not await self.ex.sleep(delay):
                self.record("disconnect")
                return
            delay = 0.0
        if scenario is not None and scenario.startswith("error_"):
            await self._error(scenario)
            return
        number = next(self.app._ids)
        try:
            if stream:
                events = endpoint.stream(self.body, number)
                await self._stream(events, delay, token_delay)
            else:
                await self._respond(endpoint.complete(self.body, number))
        except _BadRequest as exc:
            await self.ex.json(400, _error(f"fake upstream: {exc}", "invalid_request_error"))

    async def _error(self, scenario: str) -> None:
        if scenario == "error_plain_500":
            data = b"Internal Server Error"
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(data)).encode())]
            sent = await self.ex.start(500, [*headers, *self.headers]) and await self.ex.body(data)
        else:
            status, body, extra = _ERRORS[scenario]
            sent = await self.ex.json(status, body, [*self.headers, *extra])
        self.record("completed" if sent else "disconnect")

    async def _respond(self, obj: dict[str, Any]) -> None:
        """A non-stream answer, shaped by the stream scenarios' non-stream counterparts."""
        data = _dumps(obj)
        scenario = self.scenario
        if scenario == "garbage_mid_stream":
            data = _GARBAGE
        elif scenario == "inband_error":
            data = _dumps(_INBAND_ERROR)
        elif scenario == "truncate":
            data = data[: len(data) // 2]
        headers = [_JSON, (b"content-length", str(len(data)).encode()), *self.headers]
        if not await self.ex.start(200, headers):
            self.record("disconnect")
            return
        if scenario == "drop_mid_stream":
            await self.ex.body(data[: len(data) // 2], more=True)
            raise _DropConnection
        if await self.ex.body(data):
            self.record("completed")
        else:
            self.record("disconnect")

    async def _stream(self, stream: _Stream, first_delay: float, token_delay: float) -> None:
        scenario = self.scenario
        events = stream.events()
        drop_after = None
        if scenario == "garbage_mid_stream":
            events.insert(2, _GARBAGE)
        elif scenario == "inband_error":
            events = [*events[:2], _dumps(_INBAND_ERROR)]
        elif scenario == "truncate":
            events = stream.head + stream.tokens
        elif scenario == "drop_mid_stream":
            drop_after = 2
        if not await self.ex.start(200, [*_SSE, *self.headers]):
            self.record("disconnect")
            return
        self.record("started")
        if not await self.ex.sleep(first_delay):
            self.record("disconnect")
            return
        for i, event in enumerate(events):
            if i == drop_after:
                raise _DropConnection
            if i and not await self.ex.sleep(token_delay):
                self.record("disconnect")
                return
            if not await self.ex.body(b"data: " + event + b"\n\n", more=True):
                self.record("disconnect")
                return
        if await self.ex.body(b""):
            self.record("completed")
        else:
            self.record("disconnect")


@dataclass
class _Stream:
    """A stream's events in parts, so scenarios can cut it where a real failure would."""

    head: list[bytes]  # the role chunks of a chat stream
    tokens: list[bytes]
    tail: list[bytes]  # the finish_reason chunks
    usage: bytes | None

    def events(self) -> list[bytes]:
        usage = [self.usage] if self.usage is not None else []
        return [*self.head, *self.tokens, *self.tail, *usage, _DONE]


class _Endpoint:
    def complete(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        raise _BadRequest(f"non-stream requests are not supported by {type(self).__name__}")

    def stream(self, body: dict[str, Any], number: int) -> _Stream:
        raise _BadRequest(f"stream requests are not supported by {type(self).__name__}")


def _tokens(body: dict[str, Any], *fields: str) -> tuple[list[str], str]:
    for field in fields:
        limit = body.get(field)
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise _BadRequest(f"{field} must be a non-negative integer")
            return _words(limit), "length"
    return _words(DEFAULT_TOKENS), "stop"


def _words(count: int) -> list[str]:
    return [f"tok{i}" if i == 0 else f" tok{i}" for i in range(count)]


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _BadRequest("n must be a positive integer")
    return n


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Chat(_Endpoint):
    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        return 10 * len(messages) if isinstance(messages, list) else 0

    def complete(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        words, finish = _tokens(body, "max_tokens", "max_completion_tokens")
        n = _choices(body)
        message = {"role": "assistant", "content": "".join(words)}
        return {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": CREATED,
            "model": body.get("model"),
            "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": finish} for i in range(n)],
            "usage": _usage(self._prompt_tokens(body), len(words) * n),
        }

    def stream(self, body: dict[str, Any], number: int) -> _Stream:
        words, finish = _tokens(body, "max_tokens", "max_completion_tokens")
        n = _choices(body)
        base = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": body.get("model"),
        }

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _dumps({**base, "choices": [choice]})

        head = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
        tokens = [chunk(i, {"content": word}) for word in words for i in range(n)]
        tail = [chunk(i, {}, finish) for i in range(n)]
        usage = None
        if _include_usage(body):
            usage = _dumps({**base, "choices": [], "usage": _usage(self._prompt_tokens(body), len(words) * n)})
        return _Stream(head, tokens, tail, usage)


class _Completions(_Endpoint):
    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            return 10 * len(prompt)
        return 10

    def complete(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        words, finish = _tokens(body, "max_tokens")
        n = _choices(body)
        return {
            "id": f"cmpl-fake-{number}",
            "object": "text_completion",
            "created": CREATED,
            "model": body.get("model"),
            "choices": [
                {"index": i, "text": "".join(words), "logprobs": None, "finish_reason": finish} for i in range(n)
            ],
            "usage": _usage(self._prompt_tokens(body), len(words) * n),
        }

    def stream(self, body: dict[str, Any], number: int) -> _Stream:
        words, finish = _tokens(body, "max_tokens")
        n = _choices(body)
        base = {
            "id": f"cmpl-fake-{number}",
            "object": "text_completion",
            "created": CREATED,
            "model": body.get("model"),
        }

        def chunk(index: int, text: str, finish_reason: str | None = None) -> bytes:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return _dumps({**base, "choices": [choice]})

        tokens = [chunk(i, word) for word in words for i in range(n)]
        tail = [chunk(i, "", finish) for i in range(n)]
        usage = None
        if _include_usage(body):
            usage = _dumps({**base, "choices": [], "usage": _usage(self._prompt_tokens(body), len(words) * n)})
        return _Stream([], tokens, tail, usage)


class _Embeddings(_Endpoint):
    def complete(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        inputs = _embedding_inputs(body.get("input"))
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _vector(item)
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack("<8f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = 4 * len(inputs)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _embedding_inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) for t in value):
            return [value]
        return value
    raise _BadRequest("input must be a string or a non-empty list")


def _vector(item: Any) -> list[float]:
    # Multiples of 1/128 survive the float32 round trip of encoding_format=base64 exactly.
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [(b - 128) / 128 for b in digest[:8]]


class _Responses(_Endpoint):
    def complete(self, body: dict[str, Any], number: int) -> dict[str, Any]:
        words, _ = _tokens(body, "max_output_tokens")
        text = "".join(words)
        prompt = body.get("input")
        prompt_tokens = 10 * len(prompt) if isinstance(prompt, list) else 10
        return {
            "id": f"resp_fake_{number}",
            "object": "response",
            "created_at": CREATED,
            "status": "completed",
            "model": body.get("model"),
            "output": [
                {
                    "type": "message",
                    "id": f"msg_fake_{number}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }


_ENDPOINTS: dict[str, _Endpoint] = {
    "/v1/chat/completions": _Chat(),
    "/v1/completions": _Completions(),
    "/v1/embeddings": _Embeddings(),
    "/v1/responses": _Responses(),
}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _parse(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


class _QuietDrops(logging.Filter):
    """Keep the deliberate drop_mid_stream cuts out of the log, which tests print when they fail."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _DropConnection))


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="fake-model", help="comma-separated model ids")
    parser.add_argument("--name", default="fake", help="owned_by in /v1/models, x-fake-upstream header")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    app = FakeUpstream(models, args.name)
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
