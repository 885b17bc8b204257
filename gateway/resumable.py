"""Resumable streams: a generation that outlives its client's connection.

A resumable chat stream runs as a producer task owned by the app, not by the client's request: it
relays the upstream as usual and appends every numbered event (``id: <completion id>/<seq>``,
``[DONE]`` included) to an event log. The client's response is only a follower of that log, so a
client that drops loses nothing: ``GET /v1/chat/completions/{id}/stream``, on any replica sharing the
Redis, replays the events after ``Last-Event-ID`` (or ``?starting_after=N``) and tails the rest live.
The producer finishes the reply either way, and it is recorded in history as any other.

``POST /v1/chat/completions/{id}/cancel`` stops a generation on whichever replica runs it (Redis
pub/sub carries the request): the upstream is closed, the partial reply recorded, and the stream
ends with a chunk whose ``finish_reason`` is ``cancelled``, then ``[DONE]``.

The log, in Redis (one stream per generation, bounded and expiring):

    gw:sse:{tenant}:{completion id}        XADD entries, ids 0-<seq+1>: fields e (the event), f (final)
    gw:sse:{tenant}:{completion id}:owner  the end user the generation belongs to
    gw:cancel                              pub/sub channel: completion ids to cancel
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from litestar import Request, Response, get, post
from litestar.datastructures import State
from redis.exceptions import RedisError

from gateway.errors import InvalidRequest, NotFound
from gateway.history import scope_of
from gateway.relay import StreamRelay
from gateway.responses import EventStream
from gateway.sse import format_event
from gateway.stores.base import Scope, StoreUnavailable
from gateway.wire import ErrorDetail, encode

__all__ = ["Generations", "MemoryLog", "RedisLog", "handlers"]

log = logging.getLogger("gateway.resumable")

_CHANNEL = "gw:cancel"
_POLL = 1.0
"""Seconds a follower blocks on the log before looking again (and checking its idle limit)."""


class EventLog(Protocol):
    async def start(self, tenant: str, completion_id: str, user: str) -> None: ...

    async def append(self, tenant: str, completion_id: str, events: list[tuple[int, bytes]], final: bool) -> None:
        """Add numbered events; ``final`` marks the last append of the generation."""

    async def owner(self, tenant: str, completion_id: str) -> str | None:
        """The end user of a known generation of this tenant, else None."""

    async def read(
        self, tenant: str, completion_id: str, after: int, wait: float
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Events numbered above ``after`` (waiting up to ``wait`` seconds for one), and whether the
        generation's end has been read."""


class MemoryLog:
    """One process's log: resumable on this replica only (the gateway without Redis)."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._logs: dict[tuple[str, str], tuple[str, list[tuple[int, bytes]], list[bool], float]] = {}
        self._changed = asyncio.Condition()

    async def start(self, tenant: str, completion_id: str, user: str) -> None:
        now = time.monotonic()
        for key, (*_, created) in list(self._logs.items()):
            if now - created > self._ttl:
                del self._logs[key]
        self._logs[(tenant, completion_id)] = (user, [], [False], now)

    async def append(self, tenant: str, completion_id: str, events: list[tuple[int, bytes]], final: bool) -> None:
        entry = self._logs.get((tenant, completion_id))
        if entry is None:
            return
        entry[1].extend(events)
        if final:
            entry[2][0] = True
        async with self._changed:
            self._changed.notify_all()

    async def owner(self, tenant: str, completion_id: str) -> str | None:
        entry = self._logs.get((tenant, completion_id))
        return entry[0] if entry else None

    async def read(
        self, tenant: str, completion_id: str, after: int, wait: float
    ) -> tuple[list[tuple[int, bytes]], bool]:
        def ready() -> bool:
            entry = self._logs.get((tenant, completion_id))
            return entry is None or entry[2][0] or (bool(entry[1]) and entry[1][-1][0] > after)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), self._changed:
                await self._changed.wait_for(ready)
        entry = self._logs.get((tenant, completion_id))
        if entry is None:
            return [], True
        events = [(seq, event) for seq, event in entry[1] if seq > after]
        return events, entry[2][0]


class RedisLog:
    def __init__(self, redis: Any, *, ttl: float, max_events: int, prefix: str = "gw:sse") -> None:
        self._redis = redis
        self._ttl = int(ttl)
        self._max = max_events
        self._prefix = prefix

    def _key(self, tenant: str, completion_id: str) -> str:
        return f"{self._prefix}:{tenant}:{completion_id}"

    async def start(self, tenant: str, completion_id: str, user: str) -> None:
        key = self._key(tenant, completion_id)
        try:
            await self._redis.set(f"{key}:owner", user, ex=self._ttl)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def append(self, tenant: str, completion_id: str, events: list[tuple[int, bytes]], final: bool) -> None:
        key = self._key(tenant, completion_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i, (seq, event) in enumerate(events):
                    last = final and i == len(events) - 1
                    pipe.xadd(
                        key,
                        {"e": event, "f": b"1" if last else b"0"},
                        id=f"0-{seq + 1}",
                        maxlen=self._max,
                        approximate=True,
                    )
                if final and not events:
                    pipe.xadd(key, {"e": b"", "f": b"1"}, maxlen=self._max, approximate=True)
                pipe.expire(key, self._ttl)
                pipe.expire(f"{key}:owner", self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def owner(self, tenant: str, completion_id: str) -> str | None:
        try:
            user = await self._redis.get(f"{self._key(tenant, completion_id)}:owner")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return user.decode() if isinstance(user, bytes) else user

    async def read(
        self, tenant: str, completion_id: str, after: int, wait: float
    ) -> tuple[list[tuple[int, bytes]], bool]:
        key = self._key(tenant, completion_id)
        try:
            found = await self._redis.xread({key: f"0-{after + 1}"}, block=max(1, int(wait * 1000)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        events, final = [], False
        for _, entries in found or ():
            for entry_id, fields in entries:
                ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event = fields.get(b"e", fields.get("e", b""))
                if event:
                    events.append((int(ident.split("-")[1]) - 1, event))
                final = final or fields.get(b"f", fields.get("f")) in (b"1", "1")
        return events, final


class Generations:
    """The app's running resumable generations, and the followers of any generation in the log."""

    def __init__(self, events: EventLog, redis: Any, idle: float) -> None:
        self.log = events
        self._redis = redis
        self._idle = idle
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()

    async def start(self, relay: StreamRelay, first: list[bytes], scope: Scope) -> AsyncIterator[bytes]:
        """Run ``relay`` to its end in the background; the returned iterator follows it."""
        reply = relay.reply
        completion_id = reply.id or f"chatcmpl-{relay.request_id}"
        await self.log.start(scope.tenant, completion_id, scope.user or scope.tenant)
        task = asyncio.create_task(self._produce(relay, first, scope.tenant, completion_id))
        self._tasks[completion_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(completion_id, None))
        return self.follow(scope.tenant, completion_id, -1)

    async def _produce(self, relay: StreamRelay, first: list[bytes], tenant: str, completion_id: str) -> None:
        try:
            async for group in relay.groups(first):
                await self.log.append(tenant, completion_id, _numbered(group), final=False)
            await self.log.append(tenant, completion_id, [], final=True)
        except asyncio.CancelledError:
            await self._stop(relay, tenant, completion_id)
        except StoreUnavailable as exc:
            log.warning("resumable stream %s lost its log (%s); the generation is stopped", completion_id, exc)
        finally:
            await relay.finish()

    async def _stop(self, relay: StreamRelay, tenant: str, completion_id: str) -> None:
        """End a cancelled generation honestly: the client asked for it (a cancelled chunk and
        ``[DONE]``), or the gateway is shutting down (an error event, the stream left readable)."""
        await relay.close()
        asked = completion_id in self._cancelled
        self._cancelled.discard(completion_id)
        reply = relay.reply
        if asked:
            reply.error = "cancelled"
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": reply.created or 0,
                "model": reply.model or "",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "cancelled"}],
            }
            tail = [relay.numbered(format_event(encode(chunk))), relay.numbered(format_event(b"[DONE]"))]
        else:
            reply.error = "interrupted"
            detail = ErrorDetail(
                message="The gateway stopped before the reply was complete.", type="upstream_error", code="interrupted"
            )
            tail = [relay.numbered(format_event(encode({"error": detail})))]
        with contextlib.suppress(StoreUnavailable):
            await self.log.append(tenant, completion_id, _numbered(tail), final=True)

    async def follow(self, tenant: str, completion_id: str, after: int) -> AsyncIterator[bytes]:
        idle_since = time.monotonic()
        while True:
            try:
                events, final = await self.log.read(tenant, completion_id, after, _POLL)
            except StoreUnavailable as exc:
                yield _error_event("resumable_unavailable", f"The stream's log is unavailable: {exc}")
                return
            for seq, event in events:
                after = seq
                yield event
            if final:
                return
            if events:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self._idle:
                yield _error_event("idle_timeout", "The generation sent nothing for too long; it may have stopped.")
                return

    async def cancel(self, completion_id: str) -> None:
        self._cancelled.add(completion_id)
        task = self._tasks.get(completion_id)
        if task is not None:
            task.cancel()
        elif self._redis is not None:
            await self._redis.publish(_CHANNEL, completion_id)

    async def listen(self) -> None:
        """Cancels requested on other replicas, for the generations this one runs."""
        if self._redis is None:
            return
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            completion_id = message["data"].decode()
                            if completion_id in self._tasks:
                                self._cancelled.add(completion_id)
                                self._tasks[completion_id].cancel()
            except (RedisError, OSError):
                await asyncio.sleep(1.0)

    async def shutdown(self, grace: float) -> None:
        """Give running generations ``grace`` seconds, then stop them, leaving their logs readable."""
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _numbered(group: list[bytes]) -> list[tuple[int, bytes]]:
    """The numbered events of a group, with their sequence numbers (comments are not kept)."""
    out = []
    for event in group:
        if event.startswith(b"id: "):
            line = event[4 : event.index(b"\n")]
            out.append((int(line.rsplit(b"/", 1)[1]), event))
    return out


def _error_event(code: str, message: str) -> bytes:
    return format_event(encode({"error": ErrorDetail(message=message, type="upstream_error", code=code)}))


def _after(request: Request, completion_id: str) -> int:
    """Where a follower starts: after ``?starting_after=N``, or after the ``Last-Event-ID`` a browser's
    EventSource sends when it reconnects; from the first event otherwise."""
    if (value := request.query_params.get("starting_after")) is not None:
        try:
            return int(value)
        except ValueError:
            raise InvalidRequest("`starting_after` must be an integer.", param="starting_after") from None
    last = request.headers.get("last-event-id")
    if last and last.startswith(f"{completion_id}/") and last.rsplit("/", 1)[1].isdigit():
        return int(last.rsplit("/", 1)[1])
    return -1


async def _visible(request: Request, state: State, completion_id: str) -> Scope:
    scope = scope_of(request)
    owner = await state.generations.log.owner(scope.tenant, completion_id)
    if owner is None or (scope.user is not None and owner != scope.user):
        raise NotFound(f"No resumable stream found with id '{completion_id}'.", param="completion_id")
    return scope


@get("/chat/completions/{completion_id:str}/stream")
async def resume(request: Request, state: State) -> EventStream:
    completion_id = request.path_params["completion_id"]
    scope = await _visible(request, state, completion_id)
    after = _after(request, completion_id)
    return EventStream(state.generations.follow(scope.tenant, completion_id, after))


@post("/chat/completions/{completion_id:str}/cancel", status_code=200)
async def cancel(request: Request, state: State) -> Response[bytes]:
    completion_id = request.path_params["completion_id"]
    await _visible(request, state, completion_id)
    await state.generations.cancel(completion_id)
    return Response(
        encode({"id": completion_id, "object": "chat.completion.cancel", "cancelled": True}),
        media_type="application/json",
    )


handlers = [resume, cancel]
"""Served under ``/v1``."""
