"""Relaying an upstream's answer to the client.

A stream is forwarded event by event, as each event completes, in the upstream's own bytes: nothing
is buffered beyond an incomplete event, rebuilt or reordered. Each event is also decoded (msgspec,
declared fields only) into a :class:`~gateway.reply.Reply`, which is how the gateway knows what was
said without touching what is sent.

The first event is read before the response is committed, so a backend that fails early still gets
a proper HTTP error status. After that, a failure (connection dropped, idle or total timeout, bytes
that are not an event, a stream that ends without saying it is complete) ends the stream with an
OpenAI-shaped error event, which the ``openai`` SDK raises as ``APIError``. A truncated answer is
never passed off as a complete one with a fake ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
from litestar import MediaType

from gateway.backends import Backend
from gateway.deadline import Deadline
from gateway.errors import (
    GatewayError,
    NoBackendAvailable,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
    upstream_errors,
)
from gateway.guard import RepetitionGuard
from gateway.reply import Reply
from gateway.responses import STREAM_HEADERS, EventStream, Headers, WholeReply
from gateway.routing import Route, Target
from gateway.settings import Settings
from gateway.sse import DONE, EventSplitter, event_data, format_event, lone_event
from gateway.transport import FirstByteTimeout, find_header, raw_headers
from gateway.upstream import direct_transport, open_response
from gateway.wire import ErrorDetail, decode_chunk, decode_completion, rewrite_fields

__all__ = ["StreamRelay", "forward"]

log = logging.getLogger("gateway.relay")


# The Responses API ends its streams with one of these events instead of [DONE].
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class _ResponsesEvent(msgspec.Struct):
    type: str | None = None


_responses_event = msgspec.json.Decoder(_ResponsesEvent)

_NO_DEADLINE = contextlib.nullcontext()

# What the relay does with an event it observed.
_FORWARD, _SKIP, _STOP = object(), object(), object()

Resume = Callable[["StreamRelay", list[bytes]], Awaitable[AsyncIterator[bytes]]]
OnEnd = Callable[[Reply], Awaitable[None]]
"""Runs once per reply, after the response is complete (or abandoned): history, usage, limits."""


async def forward(
    route: Route,
    path: str,
    body: bytes,
    *,
    request_id: str,
    stream: bool,
    settings: Settings,
    changes: dict[str, Any] | None = None,
    reply: Reply | None = None,
    on_end: OnEnd | None = None,
    hide_usage: bool = False,
    headers: Headers | None = None,
    resume: Resume | None = None,
) -> WholeReply | EventStream:
    """Send ``body`` (with ``changes`` to its top-level fields) to the route's targets in turn until one
    answers, and relay that answer.

    Connect errors, 5xx, 429 and first-token timeouts move on to the next target (or try the same one
    again when it is the only one), with jittered backoff and the upstream's ``Retry-After``, within
    ``[retries] max_attempts`` and the request's total timeout, and only while no byte has reached
    the client. A 4xx is the client's error and is passed on at once.

    ``reply`` collects what a chat or completions answer says; Responses API streams, whose events are
    not chunks, are only checked for their terminal event. ``hide_usage``: the gateway asked the
    upstream for a usage chunk the client did not ask for, so that chunk is not forwarded. ``resume``:
    the stream is resumable; it hands the relay to a producer and returns what the client follows.
    """
    reply = reply if reply is not None else Reply()
    retries, health = settings.retries, settings.health
    deadline = time.monotonic() + route.targets[0].backend.timeouts.total
    payloads: dict[str, bytes] = {}
    last: GatewayError | None = None
    position = 0
    for attempt in range(retries.max_attempts):
        target = _next_target(route, position)
        if target is None:
            break
        position = route.targets.index(target) + 1
        backend = target.backend
        if backend.ejected_until:
            backend.trial = True  # past its cooldown: this request is the trial
        payload = payloads.get(target.served)
        if payload is None:
            model = {} if target.served == route.model else {"model": target.served}
            merged = {**(changes or {}), **model}
            payload = payloads[target.served] = rewrite_fields(body, merged) if merged else body
        if attempt:
            reply.retries += 1
        try:
            if stream:
                relay = StreamRelay(
                    backend,
                    reply,
                    responses_api=path == "/responses",
                    on_end=on_end,
                    hide_usage=hide_usage,
                    settings=settings,
                )
                first = await relay.open(path, payload, request_id)
                backend.succeeded()
                stream_headers = [*STREAM_HEADERS, *headers] if headers else STREAM_HEADERS
                if resume is not None:
                    return EventStream(await resume(relay, first), stream_headers)
                # Background work runs after the last byte, and also when the client left before the
                # body started (then the generator, and its ``finally``, never run).
                return EventStream(relay.events(first), stream_headers, background=relay.finish)
            backend.in_flight += 1
            try:
                response = await _unary(backend, path, payload, request_id, reply, on_end, headers)
            finally:
                backend.in_flight -= 1
            backend.succeeded()
            return response
        except UpstreamStatus as exc:
            if exc.status < 500 and exc.status != 429:
                backend.succeeded()  # it answered; the request was at fault
                raise
            if exc.status >= 500:
                backend.failed(f"answered {exc.status}", health.failure_threshold, health.cooldown)
            else:
                backend.trial = False  # busy is not broken
            last = exc
            wait = _retry_after(exc.headers)
        except (UpstreamUnavailable, UpstreamTimeout, UpstreamProtocolError) as exc:
            backend.failed(exc.message, health.failure_threshold, health.cooldown)
            last = exc
            wait = 0.0
        delay = min(retries.max_backoff, retries.backoff * 2**attempt) * random.uniform(0.5, 1.5)
        following = _next_target(route, position)
        if following is not None and following.backend is backend:
            delay = max(delay, wait)  # the same backend asked us to wait
        if attempt + 1 >= retries.max_attempts or following is None or time.monotonic() + delay > deadline:
            break
        log.info(
            "request %s: backend %s failed (%s); trying %s",
            request_id,
            backend.name,
            last.message,
            following.backend.name,
        )
        await asyncio.sleep(delay)
    if last is None:
        raise NoBackendAvailable(f"No backend can serve `{route.model}` right now.", param="model")
    raise last


def _next_target(route: Route, position: int) -> Target | None:
    """The first target from ``position`` on, wrapping around, that is available now."""
    now = time.monotonic()
    count = len(route.targets)
    for step in range(count):
        target = route.targets[(position + step) % count]
        if target.backend.available(now):
            return target
    return None


def _retry_after(headers: dict[str, str]) -> float:
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        return float(headers.get("retry-after", 0))
    except ValueError:
        return 0.0  # an HTTP date: too rare to parse here


async def _unary(
    backend: Backend,
    path: str,
    body: bytes,
    request_id: str,
    reply: Reply,
    on_end: OnEnd | None,
    headers: Headers | None,
) -> WholeReply:
    sent = time.monotonic()
    response = await open_response(
        backend,
        path,
        body,
        request_id=request_id,
        stream=False,
        timeout=backend.unary_timeout,
        total=backend.timeouts.total,
    )
    content = response.content
    background = None
    reply.backend = backend.name
    now = time.monotonic()
    reply.upstream_time += now - sent
    reply.first_token = now - reply.started
    try:
        reply.observe_completion(decode_completion(content, choices=reply.keep_message))
    except msgspec.DecodeError:
        log.debug("backend %s sent a reply the gateway could not read", backend.name)
    if on_end is not None:
        # A partial rather than Litestar's BackgroundTask, which inspects the callable on every call.
        background = functools.partial(on_end, reply)
    return WholeReply(content, response.status_code, _content_type(response), headers, background)


def _content_type(response: httpx.Response) -> str:
    value = find_header(raw_headers(response), b"content-type")
    return value.decode("latin-1") if value is not None else MediaType.JSON


_USAGE = b'"usage":'
_ERROR = b'"error"'
_DONE_EVENT = b"data: " + DONE + b"\n\n"


class StreamRelay:
    """One streamed answer, from the upstream's first byte to the client's last."""

    __slots__ = (
        "_backend",
        "_chunks",
        "_closed",
        "_deadline",
        "_failure",
        "_finished",
        "_guard",
        "_health",
        "_hide_usage",
        "_id_prefix",
        "_last",
        "_on_end",
        "_request_id",
        "_response",
        "_responses_api",
        "_splitter",
        "_timeouts",
        "reply",
        "sequence",
    )

    def __init__(
        self,
        backend: Backend,
        reply: Reply | None,
        *,
        responses_api: bool,
        on_end: OnEnd | None,
        settings: Settings,
        hide_usage: bool = False,
    ) -> None:
        self._backend = backend
        self._health = settings.health
        guard = settings.guard
        self._guard = RepetitionGuard(guard.repeated_ngram, guard.repeats) if guard.repeated_ngram else None
        self._hide_usage = hide_usage
        self._finished = False
        self._last = 0.0
        self._request_id = ""
        self._id_prefix = b""
        self.sequence = 0
        self.reply = reply if reply is not None else Reply()
        self._responses_api = responses_api
        self._timeouts = backend.timeouts
        self._on_end = on_end
        self._splitter = EventSplitter()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._failure: ErrorDetail | None = None
        self._closed = False
        self._deadline = 0.0
        backend.in_flight += 1

    async def open(self, path: str, body: bytes, request_id: str) -> list[bytes]:
        """Send the request and read up to the first complete event, within the first-token timeout.
        Raises a gateway error (nothing has been sent to the client yet) when that fails."""
        sent = time.monotonic()
        self._deadline = sent + self._timeouts.total
        self.reply.backend = self._backend.name
        self._request_id = request_id
        first_token = self._timeouts.first_token
        direct = direct_transport(self._backend)
        try:
            # The gateway's transport keeps the first-token deadline in its reads (until the first
            # body bytes): a Deadline's timer, set and cancelled, costs about 12,000 instructions.
            with _NO_DEADLINE if direct is not None else Deadline(first_token):
                self._response = response = await open_response(
                    self._backend,
                    path,
                    body,
                    request_id=request_id,
                    stream=True,
                    timeout=self._backend.stream_timeout,
                    total=first_token,
                    direct=direct,
                )
                # The transport's own stream, unless the upstream compressed the bytes (it was not
                # asked to): httpx's decoding and chunking layers cost microseconds a chunk for nothing.
                compressed = find_header(raw_headers(response), b"content-encoding") is not None
                self._chunks = response.aiter_bytes() if compressed else aiter(response.stream)
                with upstream_errors(self._backend.name):
                    async for chunk in self._chunks:
                        if out := self._take(chunk):
                            now = time.monotonic()
                            self.reply.upstream_time += now - sent
                            self.reply.first_token = self._last = now - self.reply.started
                            return out
                        if self._failure is not None:
                            raise UpstreamProtocolError(f"Backend `{self._backend.name}`: {self._failure.message}")
            raise UpstreamProtocolError(f"Backend `{self._backend.name}` ended the stream before its first event.")
        except (TimeoutError, UpstreamTimeout) as exc:
            await self.close()
            if isinstance(exc, UpstreamTimeout) and not isinstance(exc.__cause__, FirstByteTimeout):
                raise
            message = f"Backend `{self._backend.name}` sent no first token within {first_token:g} s."
            raise UpstreamTimeout(message) from None
        except BaseException:
            await self.close()
            raise

    def events(self, first: list[bytes]) -> AsyncIterator[bytes]:
        """The response body: the events of each of the upstream's reads as one piece, each with its
        SSE id; a failure ends them with an error event."""
        return self._relay(first, joined=True)

    def groups(self, first: list[bytes]) -> AsyncIterator[list[bytes]]:
        """The same events as :meth:`events`, in the groups the upstream's reads complete them."""
        return self._relay(first, joined=False)

    async def _relay(self, first: list[bytes], *, joined: bool) -> AsyncIterator[Any]:
        # One async generator for both: the event loop registers and finalises each one (about 7,000
        # instructions), and each generator or coroutine between the body and the upstream's read
        # is entered and left again for every event.
        reply = self.reply
        chunks = self._chunks
        assert chunks is not None
        try:
            yield (first[0] if len(first) == 1 else b"".join(first)) if joined else first
            while not reply.done and self._failure is None:
                waited = time.monotonic()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    self._fail("upstream_truncated", "The upstream closed the stream before it was complete.")
                    break
                except httpx.ReadTimeout:
                    self._fail("idle_timeout", f"The upstream sent nothing for {self._timeouts.idle:g} s.")
                    break
                except httpx.HTTPError as exc:
                    self._fail("upstream_disconnected", f"The upstream connection failed mid-stream: {exc!s}")
                    break
                now = time.monotonic()
                reply.upstream_time += now - waited
                if group := self._take(chunk):
                    since = now - reply.started
                    reply.gaps.append(since - self._last)
                    self._last = since
                    yield (group[0] if len(group) == 1 else b"".join(group)) if joined else group
                if now > self._deadline and not reply.done:
                    self._fail("total_timeout", f"The reply took longer than {self._timeouts.total:g} s.")
            if self._failure is not None:
                error = self.numbered(format_event(error_body(self._failure)))
                yield error if joined else [error]
        except (GeneratorExit, asyncio.CancelledError):
            if not reply.done and reply.error is None:
                reply.error = "cancelled"
            raise
        finally:
            await self.close()

    @property
    def request_id(self) -> str:
        return self._request_id

    def numbered(self, event: bytes) -> bytes:
        """``event`` with its SSE id, ``<completion id>/<sequence>``, which a client that reconnects
        hands back (``Last-Event-ID``) to get what it missed."""
        seq = self.sequence
        self.sequence += 1
        prefix = self._id_prefix
        if not prefix:
            # Encoded once the completion id is known (its first event); the request id until then.
            if self.reply.id is None:
                return b"id: %s/%d\n%s" % (self._request_id.encode(), seq, event)
            prefix = self._id_prefix = b"id: " + self.reply.id.encode() + b"/"
        return b"%s%d\n%s" % (prefix, seq, event)

    def _take(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes, observed and numbered, to forward; stops at a failure or at
        the end of the reply."""
        if not self._splitter.pending and lone_event(chunk):
            # A model's token, one event a read: observed without cutting its data out first.
            verdict = self._observe(chunk, whole=True)
            return [self.numbered(chunk)] if verdict is _FORWARD else []
        events = self._splitter.feed(chunk)
        if not events:
            return []
        forward = []
        for event in events:
            data = event_data(event)
            if data is None:
                forward.append(event)  # a comment (keep-alive): passed on, not numbered
                continue
            verdict = self._observe(data)
            if verdict is _STOP:
                break
            if verdict is _FORWARD:
                forward.append(self.numbered(event))
            if self.reply.done:
                break
        return forward

    def _observe(self, data: bytes, *, whole: bool = False) -> object:
        """Read one event's data into the reply, and say what becomes of the event. ``whole``: ``data``
        is the whole event, one ``data: `` line (:func:`~gateway.sse.lone_event`); the byte patterns
        below find the same in it."""
        reply = self.reply
        if data == (_DONE_EVENT if whole else DONE):
            reply.done = True
            return _FORWARD
        if (
            not reply.keep_message
            and self._guard is None
            and reply.id is not None
            and not self._responses_api
            and ((at := data.find(_USAGE)) < 0 or data.find(b"{", at + 8, at + 10) < 0)
            and data.find(_ERROR) < 0
        ):
            # Nothing in this chunk is wanted: decoding every token's chunk would be most of the
            # relay's CPU. The byte patterns cannot match inside a string value, where quotes are
            # escaped. Usage counts when it is an object ("usage":{ or "usage": {), not null.
            # find() rather than ``in``: for bytes, ``in`` first tries its operand as an integer and
            # drops the TypeError, twice find()'s cost on a token's chunk (3.11).
            return _FORWARD
        if whole:
            data = data[6:-2]
        try:
            if self._responses_api:
                if _responses_event.decode(data).type in _RESPONSES_TERMINAL:
                    reply.done = True
                return _FORWARD
            # The choices only for whoever reads them: history and body logs, the guard, the usage
            # chunk held back (it is the one without choices).
            chunk = decode_chunk(data, choices=reply.keep_message or self._guard is not None or self._hide_usage)
        except msgspec.ValidationError:
            return _FORWARD  # JSON, but not in the shape we read: still the upstream's to say.
        except msgspec.DecodeError:
            self._fail("upstream_protocol_error", "The upstream sent an event that is not JSON.")
            return _STOP
        if chunk.error:
            # The upstream reported its own failure in-band; the client gets it as sent.
            reply.error = "upstream_error"
        reply.observe_chunk(chunk)
        if self._guard is not None and chunk.choices:
            for choice in chunk.choices:
                delta = choice.delta
                if choice.index == 0 and delta is not None and delta.content and self._guard.feed(delta.content):
                    self._fail("repetition_detected", "The reply kept repeating itself, so the gateway stopped it.")
                    return _STOP
        if self._hide_usage and chunk.usage is not None and not chunk.choices:
            return _SKIP
        return _FORWARD

    def _fail(self, code: str, message: str) -> None:
        if self.reply.error is not None and self.reply.error != "cancelled":
            return  # the upstream already told the client why
        self._failure = ErrorDetail(message=message, type="upstream_error", code=code)
        self.reply.error = code
        log.warning("stream from backend %s failed: %s", self._backend.name, message)
        # Before the first event, the retry loop reports the failure; after it, only the relay knows.
        committed = self.reply.first_token is not None
        if committed and code in (
            "upstream_disconnected",
            "idle_timeout",
            "upstream_truncated",
            "upstream_protocol_error",
        ):
            self._backend.failed(message, self._health.failure_threshold, self._health.cooldown)

    async def close(self) -> None:
        """Release the upstream, once, whether the stream finished, failed or the client left.

        Neither this nor :meth:`finish` is shielded from cancellation: releasing the response hands
        its connection back at once, and ``on_end`` only books and queues, so neither suspends and
        no cancellation can land inside them. anyio's ``CancelScope(shield=True)`` would not help:
        it stops only anyio's own cancellations, not a ``Task.cancel()`` such as a client's
        disconnect, and costs 32k instructions to enter and leave."""
        if self._closed:
            return
        self._closed = True
        self._backend.in_flight -= 1
        response = self._response
        if response is not None and not response.is_closed:
            # What Response.aclose() does, less the generator-based context manager it wraps the
            # stream's aclose() in, which names the request in an error: 11,000 instructions a stream.
            response.is_closed = True
            await response.stream.aclose()  # type: ignore[union-attr]

    async def finish(self) -> None:
        """After the response: release the upstream if that has not happened, then ``on_end``, once."""
        await self.close()
        if self._finished or self._on_end is None:
            return
        self._finished = True
        if not self.reply.done and self.reply.error is None:
            self.reply.error = "cancelled"
        await self._on_end(self.reply)
