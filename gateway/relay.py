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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import httpx
import msgspec
from litestar import MediaType, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway.backends import Backend
from gateway.errors import UpstreamProtocolError, UpstreamTimeout, error_body, upstream_errors
from gateway.reply import Reply
from gateway.routing import Route
from gateway.settings import TimeoutSettings
from gateway.sse import DONE, EventSplitter, event_data, format_event
from gateway.upstream import open_response, upstream_timeout
from gateway.wire import ErrorDetail, decode_chunk, decode_completion

__all__ = ["STREAM_HEADERS", "StreamRelay", "forward"]

log = logging.getLogger("gateway.relay")

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# The Responses API ends its streams with one of these events instead of [DONE].
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


class _ResponsesEvent(msgspec.Struct):
    type: str | None = None


_responses_event = msgspec.json.Decoder(_ResponsesEvent)

# What the relay does with an event it observed.
_FORWARD, _SKIP, _STOP = object(), object(), object()

OnEnd = Callable[[Reply], Awaitable[None]]
"""Runs once per reply, after the response is complete (or abandoned): history, usage, limits."""


async def forward(
    route: Route,
    path: str,
    body: bytes,
    *,
    request_id: str,
    stream: bool,
    timeouts: TimeoutSettings,
    reply: Reply | None = None,
    on_end: OnEnd | None = None,
    hide_usage: bool = False,
    headers: dict[str, str] | None = None,
) -> Response[bytes] | Stream:
    """Send ``body`` to the route's best backend and relay its answer.

    ``reply`` collects what a chat or completions answer says; Responses API streams, whose events are
    not chunks, are only checked for their terminal event. ``hide_usage``: the gateway asked the
    upstream for a usage chunk the client did not ask for, so that chunk is not forwarded.
    """
    backend = route.backends[0]
    if stream:
        relay = StreamRelay(
            backend, reply, responses_api=path == "/responses", timeouts=timeouts, on_end=on_end, hide_usage=hide_usage
        )
        first = await relay.open(path, body, request_id)
        # Background work runs after the last byte, and also when the client left before the body
        # started (then the generator, and its ``finally``, never run).
        return Stream(
            relay.events(first),
            media_type="text/event-stream",
            headers=STREAM_HEADERS | headers if headers else STREAM_HEADERS,
            status_code=200,
            background=relay.finish,
        )
    backend.in_flight += 1
    try:
        return await _unary(backend, path, body, request_id, timeouts, reply, on_end, headers)
    finally:
        backend.in_flight -= 1


async def _unary(
    backend: Backend,
    path: str,
    body: bytes,
    request_id: str,
    timeouts: TimeoutSettings,
    reply: Reply | None,
    on_end: OnEnd | None,
    headers: dict[str, str] | None,
) -> Response[bytes]:
    sent = time.monotonic()
    try:
        async with asyncio.timeout(timeouts.total):
            response = await open_response(
                backend,
                path,
                body,
                request_id=request_id,
                stream=False,
                timeout=upstream_timeout(timeouts, stream=False),
            )
            try:
                with upstream_errors(backend.name):
                    content = await response.aread()
            finally:
                await response.aclose()
    except TimeoutError:
        raise UpstreamTimeout(f"Backend `{backend.name}` did not answer within {timeouts.total:g} s.") from None
    background = None
    if reply is not None:
        reply.backend = backend.name
        reply.upstream_time += time.monotonic() - sent
        reply.first_token = time.monotonic() - reply.started
        try:
            reply.observe_completion(decode_completion(content))
        except msgspec.DecodeError:
            log.debug("backend %s sent a reply the gateway could not read", backend.name)
        if on_end is not None:
            background = BackgroundTask(on_end, reply)
    return Response(
        content=content,
        status_code=response.status_code,
        media_type=response.headers.get("content-type", MediaType.JSON),
        headers=headers,
        background=background,
    )


class StreamRelay:
    """One streamed answer, from the upstream's first byte to the client's last."""

    __slots__ = (
        "_backend",
        "_chunks",
        "_closed",
        "_deadline",
        "_failure",
        "_finished",
        "_hide_usage",
        "_last",
        "_on_end",
        "_response",
        "_responses_api",
        "_splitter",
        "_timeouts",
        "reply",
    )

    def __init__(
        self,
        backend: Backend,
        reply: Reply | None,
        *,
        responses_api: bool,
        timeouts: TimeoutSettings,
        on_end: OnEnd | None,
        hide_usage: bool = False,
    ) -> None:
        self._backend = backend
        self._hide_usage = hide_usage
        self._finished = False
        self._last = 0.0
        self.reply = reply if reply is not None else Reply()
        self._responses_api = responses_api
        self._timeouts = timeouts
        self._on_end = on_end
        self._splitter = EventSplitter()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._failure: ErrorDetail | None = None
        self._closed = False
        self._deadline = 0.0
        backend.in_flight += 1

    async def open(self, path: str, body: bytes, request_id: str) -> bytes:
        """Send the request and read up to the first complete event, within the first-token timeout.
        Raises a gateway error (nothing has been sent to the client yet) when that fails."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeouts.total
        self.reply.backend = self._backend.name
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._timeouts.first_token):
                self._response = await open_response(
                    self._backend,
                    path,
                    body,
                    request_id=request_id,
                    stream=True,
                    timeout=upstream_timeout(self._timeouts, stream=True),
                )
                self._chunks = self._response.aiter_bytes()
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
        except TimeoutError:
            await self.close()
            raise UpstreamTimeout(
                f"Backend `{self._backend.name}` sent no first token within {self._timeouts.first_token:g} s."
            ) from None
        except BaseException:
            await self.close()
            raise

    async def events(self, first: bytes) -> AsyncIterator[bytes]:
        reply = self.reply
        try:
            yield first
            assert self._chunks is not None
            loop = asyncio.get_running_loop()
            while not reply.done and self._failure is None:
                waited = time.monotonic()
                try:
                    chunk = await anext(self._chunks)
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
                if out := self._take(chunk):
                    since = now - reply.started
                    reply.gaps.append(since - self._last)
                    self._last = since
                    yield out
                if loop.time() > self._deadline and not reply.done:
                    self._fail("total_timeout", f"The reply took longer than {self._timeouts.total:g} s.")
            if self._failure is not None:
                yield format_event(error_body(self._failure))
        except (GeneratorExit, asyncio.CancelledError):
            if not reply.done and reply.error is None:
                reply.error = "cancelled"
            raise
        finally:
            await self.close()

    def _take(self, chunk: bytes) -> bytes:
        """The events ``chunk`` completes, observed, as bytes to forward; stops at a failure or at the
        end of the reply."""
        events = self._splitter.feed(chunk)
        if not events:
            return b""
        forward = []
        for event in events:
            data = event_data(event)
            verdict = _FORWARD if data is None else self._observe(data)
            if verdict is _STOP:
                break
            if verdict is _FORWARD:
                forward.append(event)
            if self.reply.done:
                break
        if not forward:
            return b""
        return forward[0] if len(forward) == 1 else b"".join(forward)

    def _observe(self, data: bytes) -> object:
        """Read one event's data into the reply, and say what becomes of the event."""
        reply = self.reply
        if data == DONE:
            reply.done = True
            return _FORWARD
        try:
            if self._responses_api:
                if _responses_event.decode(data).type in _RESPONSES_TERMINAL:
                    reply.done = True
                return _FORWARD
            chunk = decode_chunk(data)
        except msgspec.ValidationError:
            return _FORWARD  # JSON, but not in the shape we read: still the upstream's to say.
        except msgspec.DecodeError:
            self._fail("upstream_protocol_error", "The upstream sent an event that is not JSON.")
            return _STOP
        if chunk.error:
            # The upstream reported its own failure in-band; the client gets it as sent.
            reply.error = "upstream_error"
        reply.observe_chunk(chunk)
        if self._hide_usage and chunk.usage is not None and not chunk.choices:
            return _SKIP
        return _FORWARD

    def _fail(self, code: str, message: str) -> None:
        if self.reply.error is not None and self.reply.error != "cancelled":
            return  # the upstream already told the client why
        self._failure = ErrorDetail(message=message, type="upstream_error", code=code)
        self.reply.error = code
        log.warning("stream from backend %s failed: %s", self._backend.name, message)

    async def close(self) -> None:
        """Release the upstream, once, whether the stream finished, failed or the client left.
        Shielded: it runs while the client's disconnect is cancelling the response."""
        if self._closed:
            return
        self._closed = True
        self._backend.in_flight -= 1
        if self._response is not None:
            with anyio.CancelScope(shield=True):
                await self._response.aclose()

    async def finish(self) -> None:
        """After the response: release the upstream if that has not happened, then ``on_end``, once."""
        await self.close()
        if self._finished or self._on_end is None:
            return
        self._finished = True
        if not self.reply.done and self.reply.error is None:
            self.reply.error = "cancelled"
        with anyio.CancelScope(shield=True):
            await self._on_end(self.reply)
