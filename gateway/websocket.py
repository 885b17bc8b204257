"""``/v1/chat/ws``: chat completions over a WebSocket.

The protocol, every frame text (a binary frame from the client is read as UTF-8 text)::

    client -> gateway   a chat completion request: the body of POST /v1/chat/completions, with
                        `conversation` if wanted; any number of them, one after the other
    client -> gateway   {"type": "cancel"}: stop the request being answered
    gateway -> client   "stream": true: each chunk as the upstream sent it (the `data:` of each SSE
                        event, byte for byte), one per frame; otherwise the chat.completion object,
                        one frame. Then [DONE].
    gateway -> client   a failure: the OpenAI error object the POST would answer, {"error": {...}},
                        then [DONE]. The HTTP status is not repeated: `type` and `code` say the same.

Every request ends with exactly one ``[DONE]`` frame, non-stream requests and failures included, so a
client waits for one end marker. As over SSE, an error frame right before it means the answer is
incomplete; the socket stays open for the next request either way.

Requests that arrive while one is being answered are queued and answered in order. A cancel applies
to the request being answered (the oldest one its ``[DONE]`` has not ended yet) and is ignored when
there is none. A cancelled request ends with a chunk of the stream's ``id``, ``model`` and ``created``
whose ``choices`` are ``[{"index": 0, "delta": {}, "finish_reason": "cancelled"}]``, then ``[DONE]``;
the upstream is closed first and the partial reply recorded as cancelled, as when an HTTP client
leaves. A cancel that comes before the answer started (no chunk yet, or a non-stream request) gets
the same frames at once, with ``id`` ``chatcmpl-<request id>`` and the requested model, while the
request runs to its end in the background (see ``_abandon``). A client that disconnects stops the
request being answered the same way, and its queued requests are dropped; a resumable stream
(gateway/resumable.py) is left running then, for the client to resume.

Authentication is the handshake's: the ``/v1`` guard reads ``Authorization`` (or ``api-key``) and
refuses the upgrade without a valid key. Each request gets its own request id, the socket's (the
client's ``x-request-id`` or a new one) with ``-1``, ``-2``... appended, which goes upstream and into
history as for HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Response, WebSocket, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from litestar.response import Stream
from litestar.utils.scope.state import CONNECTION_STATE_KEY

from gateway.api import _chat
from gateway.auth import authenticate
from gateway.errors import GatewayError, PayloadTooLarge, render
from gateway.reply import Reply
from gateway.request import request_id
from gateway.sse import DONE, event_data
from gateway.stores.base import StoreUnavailable

__all__ = ["chat_socket"]

log = logging.getLogger("gateway.websocket")

_ROUTE = "/v1/chat/ws"
_CANCELLED = 499
"""The status reported for a request cancelled before its answer ended (nginx's convention)."""

_DONE = DONE.decode()
_RESUMABLE_GRACE = 5.0
"""Seconds a cancelled resumable generation has to end its stream before the socket stops following it."""


class _Frame(msgspec.Struct):
    """What the gateway reads of a frame before handing it to the chat pipeline."""

    type: str | None = None
    model: str | None = None


_frame = msgspec.json.Decoder(_Frame)


@dataclass(slots=True)
class _Job:
    """One request frame, from its arrival to its ``[DONE]``."""

    body: bytes
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@websocket("/chat/ws", guards=[authenticate])
async def chat_socket(socket: WebSocket, state: State) -> None:
    await socket.accept()
    await _Session(socket, state).serve()


class _Session:
    """One socket: a receive loop (the handler's task) and an answer loop (a task of its own), so a
    cancel is read while an answer is being sent."""

    def __init__(self, socket: WebSocket, state: State) -> None:
        self.socket = socket
        self.state = state
        self.open = True
        self.jobs: collections.deque[_Job] = collections.deque()
        self.arrived = asyncio.Event()
        self.answered = 0
        self.socket_id = request_id(socket.scope)
        self.abandoned: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        answering = asyncio.create_task(self._answer_all())
        try:
            await self._receive_all()
        finally:
            self._close()
            # Shielded: closing the upstream and recording the reply must happen even when the server
            # cancels this handler on its way out.
            await asyncio.shield(self._wind_down(answering))

    async def _wind_down(self, answering: asyncio.Task[None]) -> None:
        try:
            await answering
        except Exception:
            log.exception("websocket session %s failed", self.socket_id)
        # Then the requests stopped before their answer started, some perhaps by the close itself.
        await asyncio.gather(*self.abandoned, return_exceptions=True)

    async def _receive_all(self) -> None:
        while True:
            message = await self.socket.receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            text = message.get("text")
            body = text.encode() if text is not None else message.get("bytes") or b""
            if _is_cancel(body):
                if self.jobs:
                    self.jobs[0].stop.set()
                continue
            self.jobs.append(_Job(body))
            self.arrived.set()

    def _close(self) -> None:
        self.open = False
        if self.jobs:
            self.jobs[0].stop.set()
        self.arrived.set()

    async def _answer_all(self) -> None:
        while True:
            while not self.jobs:
                if not self.open:
                    return
                self.arrived.clear()
                await self.arrived.wait()
            if not self.open:
                return  # the client left: its queued requests go unanswered
            try:
                await self._answer(self.jobs[0])
            except Exception as exc:
                # A bug of ours (render logs it): this request fails, the socket goes on.
                await self._send(render(exc, self.socket_id).content)
                await self._send(_DONE)
            finally:
                self.jobs.popleft()

    async def _answer(self, job: _Job) -> None:
        self.answered += 1
        rid = f"{self.socket_id}-{self.answered}"
        # _chat reads only its request's scope. Each request gets a scope state of its own:
        # its request id, and what _chat notes there (model, reply...), as an HTTP request would.
        noted = {k: v for k, v in self.socket.scope["state"].items() if k != CONNECTION_STATE_KEY}
        noted["request_id"] = rid
        started = time.perf_counter()
        status = 500  # unless it is answered: a bug of ours (_run reports it to the client)
        try:
            status = await self._respond(job, rid, noted)
        except asyncio.CancelledError:
            status = _CANCELLED  # the socket is closing
            raise
        finally:
            # Its metrics and access line, as an HTTP request's (the socket itself gets none).
            scope = {**self.socket.scope, "state": noted, "method": "WEBSOCKET", "path_template": _ROUTE}
            self.state.observer.report(scope, status, time.perf_counter() - started, job.body)

    async def _respond(self, job: _Job, rid: str, noted: dict[str, Any]) -> int:
        """Answer one request; the HTTP status it would have had (499: cancelled)."""
        if job.stop.is_set():  # cancelled while queued
            await self._cancelled(job, noted)
            return _CANCELLED
        try:
            if len(job.body) > self.state.settings.server.max_body_size:
                raise PayloadTooLarge()
            chatting = asyncio.ensure_future(_chat({**self.socket.scope, "state": noted}, self.state, job.body))
            if not await _first(chatting, job.stop):
                self._abandon(chatting, noted)
                await self._cancelled(job, noted)
                return _CANCELLED
            response = chatting.result()
        except Exception as exc:
            error = render(exc, rid)
            await self._send(error.content)
            await self._send(_DONE)
            return error.status_code or 500
        if isinstance(response, Stream):
            return 200 if await self._relay(response, job, noted) else _CANCELLED
        try:
            await self._send(response.content)
        finally:
            await _background(response)
        await self._send(_DONE)
        return response.status_code or 200

    async def _relay(self, stream: Stream, job: _Job, noted: dict[str, Any]) -> bool:
        """Forward a stream's events; False when it was cancelled."""
        pumping = asyncio.ensure_future(self._pump(stream.iterator))
        try:
            stopped = not await _first(pumping, job.stop)
            if stopped and self.open and stream.background is None:
                # No background work: the stream follows a resumable generation, which a producer task
                # runs (gateway/resumable.py) and which outlives this stream. Its own cancel stops it
                # and ends its stream with the cancelled chunk, for the pump to forward.
                await self.state.generations.cancel(_completion_id(noted))
                await asyncio.wait((pumping,), timeout=_RESUMABLE_GRACE)
        finally:
            if not pumping.done():
                pumping.cancel()
                await asyncio.wait((pumping,))
            # Closing the relay's generator closes the upstream, and its background work records the
            # reply: a stream stopped part-way is recorded as cancelled.
            aclose = getattr(stream.iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await _background(stream)
        if pumping.cancelled():
            await self._cancelled(job, noted)
            return False
        pumping.result()  # a bug in the pump: raise it
        await self._send(_DONE)
        return True

    async def _pump(self, events: AsyncIterable[str | bytes]) -> None:
        """Send the data of each event as a frame, but for the upstream's ``[DONE]``: the gateway sends
        its own, once the stream is over."""
        async for item in events:
            raw = item.encode() if isinstance(item, str) else item
            for event in raw.split(b"\n\n")[:-1]:  # items are whole events, each ending in a blank line
                data = event_data(event + b"\n\n")
                if data is not None and data != DONE and not await self._send(data):
                    return

    async def _cancelled(self, job: _Job, noted: dict[str, Any]) -> None:
        """The last chunk of a cancelled request, named as the stream's chunks were when it had some."""
        reply: Reply | None = noted.get("reply")
        named = reply if reply is not None and reply.id is not None else None
        chunk = {
            "id": _completion_id(noted),
            "object": "chat.completion.chunk",
            "created": named.created if named is not None and named.created is not None else int(time.time()),
            "model": (named.model if named is not None else None) or _model_of(job.body) or "",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "cancelled"}],
        }
        await self._send(msgspec.json.encode(chunk))
        await self._send(_DONE)

    def _abandon(self, chatting: asyncio.Future[Response[bytes] | Stream], noted: dict[str, Any]) -> None:
        """Let a request stopped before its answer started run to its end in the background, then drop
        the answer. _chat settles the key's rate-limit reservation and records the reply only once it
        has returned: cancelling it half-way would hold a parallel slot until its lease expires."""
        task = asyncio.ensure_future(self._drop(chatting, noted, cancelled=self.open))
        self.abandoned.add(task)
        task.add_done_callback(self.abandoned.discard)

    async def _drop(
        self, chatting: asyncio.Future[Response[bytes] | Stream], noted: dict[str, Any], *, cancelled: bool
    ) -> None:
        try:
            response = await chatting
        except (GatewayError, StoreUnavailable):
            return  # the pipeline released what it held; nobody waits for the error
        except Exception:
            log.exception("request %s, cancelled before its answer, failed", noted["request_id"])
            return
        if isinstance(response, Stream):
            if cancelled and response.background is None:
                await self.state.generations.cancel(_completion_id(noted))  # resumable: see _relay
            aclose = getattr(response.iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        await _background(response)

    async def _send(self, frame: bytes | str) -> bool:
        """Send one text frame; False, and the session closed, when the client is gone."""
        if not self.open:
            return False
        try:
            await self.socket.send_text(frame if isinstance(frame, str) else frame.decode("utf-8", "replace"))
        except (WebSocketDisconnect, OSError, RuntimeError):
            # OSError: uvicorn's ClientDisconnected; RuntimeError: a send after the close was seen.
            self._close()
            return False
        return True


def _is_cancel(body: bytes) -> bool:
    if b"cancel" not in body:
        return False  # most frames are requests: spare them a second decoding
    try:
        return _frame.decode(body).type == "cancel"
    except msgspec.DecodeError:  # ValidationError included
        return False


def _model_of(body: bytes) -> str | None:
    try:
        return _frame.decode(body).model
    except msgspec.DecodeError:
        return None


def _completion_id(noted: dict[str, Any]) -> str:
    """The id of the request's chunks; before the first, the one resumable generations use."""
    reply: Reply | None = noted.get("reply")
    return (reply.id if reply is not None else None) or f"chatcmpl-{noted['request_id']}"


async def _first(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait for ``work`` or ``stop``, whichever comes first; True when ``work`` is done."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    return work.done()


async def _background(response: Response[Any]) -> None:
    if response.background is not None:
        await response.background()
