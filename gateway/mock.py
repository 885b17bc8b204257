"""The built-in mock model: a deterministic OpenAI-compatible server inside the gateway.

It is an httpx transport, so a ``mock`` backend is reached through the same upstream and relay code
as vLLM or OpenAI, with no socket in between. It answers chat completions (streamed or not, ``n``
choices, ``stream_options.include_usage``), legacy completions, embeddings and ``GET /models``.

The reply echoes the last user message word by word; with ``max_tokens`` it is cut or padded with
filler to exactly that many tokens (finish reason ``length``), which gives benchmarks streams of a
known size. ``token_delay`` spaces the streamed tokens like a real model's.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from gateway.settings import BackendSettings
from gateway.tokens import estimate_messages, estimate_text, message_text

__all__ = ["MockModelTransport", "reply_tokens"]

_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
_EMBEDDING_SIZE = 16


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Request(msgspec.Struct):
    model: str = ""
    messages: list[dict[str, Any]] | None = None
    prompt: Any = None
    input: Any = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1


_decoder = msgspec.json.Decoder(_Request)
_encode = msgspec.json.Encoder().encode


def reply_tokens(text: str, max_tokens: int | None) -> tuple[list[str], str]:
    """The mock's reply to ``text`` as tokens, and its finish reason."""
    words = text.split() or ["Hello!"]
    if max_tokens is not None:
        words = [*words, *itertools.islice(itertools.cycle(_FILLER), max(0, max_tokens - len(words)))]
        words = words[:max_tokens]
    tokens = [word if i == 0 else " " + word for i, word in enumerate(words)]
    return tokens, "length" if max_tokens is not None else "stop"


class MockModelTransport(httpx.AsyncBaseTransport):
    def __init__(self, settings: BackendSettings) -> None:
        self.models = settings.models or ["mock"]
        self.token_delay = settings.token_delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rsplit("/v1", 1)[-1]
        if request.method == "GET" and path == "/models":
            return _json(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in self.models],
                },
            )
        if request.method != "POST" or path not in ("/chat/completions", "/completions", "/embeddings"):
            return _error(404, f"The mock backend does not serve {request.method} {path}.", "not_found")
        try:
            body = _decoder.decode(await request.aread())
        except msgspec.DecodeError as exc:
            return _error(400, f"Invalid request body: {exc}", "invalid_request")
        if not any(fnmatch.fnmatchcase(body.model, m) for m in self.models):
            return _error(404, f"The model `{body.model}` does not exist.", "model_not_found", param="model")
        if body.n < 1 or body.n > 128:
            return _error(400, "`n` must be between 1 and 128.", "invalid_value", param="n")
        if path == "/embeddings":
            return _json(200, _embeddings(body))
        if path == "/chat/completions" and not isinstance(body.messages, list):
            return _error(400, "`messages` is required.", "missing_required_parameter", param="messages")
        return self._complete(body, chat=path == "/chat/completions")

    def _complete(self, body: _Request, *, chat: bool) -> httpx.Response:
        if chat:
            messages = body.messages or []
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            text = message_text(users[-1]) if users else ""
            prompt_tokens = estimate_messages(messages)
        else:
            text = body.prompt if isinstance(body.prompt, str) else ""
            prompt_tokens = estimate_text(text)
        tokens, finish = reply_tokens(text, body.max_completion_tokens or body.max_tokens)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens) * body.n,
            "total_tokens": prompt_tokens + len(tokens) * body.n,
        }
        prefix = "chatcmpl" if chat else "cmpl"
        # Unique across restarts: history stores completions by this id.
        ident = f"{prefix}-mock-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(ident, created, body, tokens, finish, usage if include_usage else None, chat)
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                stream=_DelayedStream(events, self.token_delay),
            )
        content = "".join(tokens)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(body.n)
            ]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": content, "logprobs": None, "finish_reason": finish} for i in range(body.n)]
            kind = "text_completion"
        return _json(
            200,
            {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices, "usage": usage},
        )


def _stream_events(
    ident: str,
    created: int,
    body: _Request,
    tokens: list[str],
    finish: str,
    usage: dict[str, int] | None,
    chat: bool,
) -> list[bytes]:
    """Every SSE event of a streamed reply, one per token per choice; the first token of each choice
    carries the assistant role, as OpenAI's first chunk does."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices, **extra}
        return b"data: " + _encode(chunk) + b"\n\n"

    def choice(index: int, token: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": token or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {} if token is None else {"content": token}
        if first:
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    events = [
        event([choice(i, token, None, first=position == 0)])
        for position, token in enumerate(tokens)
        for i in range(body.n)
    ]
    events.extend(event([choice(i, None, finish)]) for i in range(body.n))
    if usage is not None:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return events


class _DelayedStream(httpx.AsyncByteStream):
    def __init__(self, events: list[bytes], delay: float) -> None:
        self._events = events
        self._delay = delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, event in enumerate(self._events):
            if self._delay and i:
                await asyncio.sleep(self._delay)
            yield event


def _embeddings(body: _Request) -> dict[str, Any]:
    inputs = body.input if isinstance(body.input, list) else [body.input]
    data = [{"object": "embedding", "index": i, "embedding": _vector(str(text))} for i, text in enumerate(inputs)]
    tokens = sum(estimate_text(str(text)) for text in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _vector(text: str) -> list[float]:
    """A unit vector that depends only on the text: equal texts embed equally."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:_EMBEDDING_SIZE]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _json(status: int, payload: Any) -> httpx.Response:
    return httpx.Response(status, content=_encode(payload), headers={"content-type": "application/json"})


def _error(status: int, message: str, code: str, *, param: str | None = None) -> httpx.Response:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}})
