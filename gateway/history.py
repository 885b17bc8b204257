"""Recording chats, and the conversation context that precedes them.

A chat request becomes a :class:`Turn`: before it is forwarded, the turn reads its conversation (if
it names one) and rewrites the body to carry the history; when the reply ends, it builds one
:class:`~gateway.stores.base.Exchange` (the completion record and the conversation's new items) and
hands it to the :class:`History` writer.

The writer sits off the request path: the exchange is queued after the client has its last byte,
and written by one background task. While the store is down, exchanges wait in a bounded queue (the
oldest dropped past ``[history] queue_size``, and counted) and are written when it is back. Reading a
conversation cannot wait like that: a request with ``conversation`` gets a 503 rather than an answer
without its context.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request

from gateway import conversations
from gateway.errors import NotFound, ServiceUnavailable
from gateway.reply import Reply
from gateway.request import header
from gateway.settings import HistorySettings
from gateway.stores.base import (
    CompletionRecord,
    ConversationRecord,
    Exchange,
    ExchangesRefused,
    HistoryStore,
    Scope,
    StoreUnavailable,
)
from gateway.wire import REMOVE, ChatRequest

__all__ = ["History", "Turn", "conversation_id", "scope_of"]

log = logging.getLogger("gateway.history")

DEFAULT_TENANT = "default"
# How long a conversation read waits for this replica's own queued write of the previous turn, so a
# client that sends its next turn the moment the last one ends still sees it.
_READ_YOUR_WRITES = 2.0
_RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH = 64
"""Records written per round of the writer."""


def scope_of(request: Request | dict[str, Any], user: str | None = None) -> Scope:
    """Who is asking: the tenant (set by authentication; one tenant in open mode) and the end user
    the request names, in its body (``user`` / ``safety_identifier``, passed here) or ``X-User-Id``.
    ``request``: a request, or its ASGI scope."""
    scope = request if isinstance(request, dict) else request.scope
    tenant = scope.get("state", {}).get("tenant") or DEFAULT_TENANT
    return Scope(tenant, user or header(scope, b"x-user-id") or None)


def conversation_id(value: Any) -> str | None:
    """A chat's ``conversation``: an id, or ``{"id": ...}`` as the Responses API also accepts."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


class History:
    """The app's history service: the store, and the queue in front of its writes."""

    def __init__(self, store: HistoryStore, settings: HistorySettings) -> None:
        self.store = store
        self.settings = settings
        self._queue: collections.deque[Exchange] = collections.deque()
        self._wakeup = asyncio.Event()
        self._pending: collections.Counter[str] = collections.Counter()
        # Notified after every write: what read-your-writes and drain() wait on.
        self._progress = asyncio.Condition()
        self.dropped = 0
        self.written = 0
        self.store_errors = 0
        """Store operations that failed (Redis unreachable): conversation reads and queued writes."""
        self.degraded: str | None = None
        """Why the last write failed, while writes are failing."""

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the request side -----------------------------------------------------------------------

    async def begin(self, scope: Scope, chat: ChatRequest, *, model: str, request_id: str) -> Turn:
        conversation = None
        stored: list[dict[str, Any]] = []
        if chat.conversation is not None:
            conversation = conversation_id(chat.conversation)
            if conversation is None:
                raise NotFound("`conversation` must be a conversation id.", param="conversation")
            await self._settled(conversation)
            try:
                stored = await self.store.items(scope, conversation) or []
                if not stored and await self.store.get_conversation(scope, conversation) is None:
                    raise NotFound(f"No conversation found with id '{conversation}'.", param="conversation")
            except StoreUnavailable as exc:
                self.store_errors += 1
                raise ServiceUnavailable(
                    f"Conversation history is unavailable right now ({exc}); retry shortly.",
                    code="history_unavailable",
                ) from None
        record = self.settings.store_all or bool(chat.store)
        return Turn(
            self,
            scope,
            chat,
            model=model,
            request_id=request_id,
            conversation=conversation,
            stored=stored,
            record=record,
        )

    async def _settled(self, conversation: str) -> None:
        if self._pending[conversation]:
            await self._wait_for(lambda: not self._pending[conversation], _READ_YOUR_WRITES)

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._progress:
                await self._progress.wait_for(predicate)

    # -- the writer side ------------------------------------------------------------------------

    def submit(self, exchange: Exchange) -> None:
        if len(self._queue) >= self.settings.queue_size:
            lost = self._queue.popleft()
            self._forget(lost)
            self.dropped += 1
            log.warning(
                "history queue full (%d): dropped the oldest record (%d dropped so far)",
                self.settings.queue_size,
                self.dropped,
            )
        self._queue.append(exchange)
        if exchange.conversation:
            self._pending[exchange.conversation] += 1
        self._wakeup.set()

    async def run(self) -> None:
        """The writer task the app's lifespan runs. It writes what has queued up in batches: under
        load, one batch takes two Redis round trips where a record each took two."""
        failures = 0
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(itertools.islice(self._queue, _BATCH))
            try:
                await self.store.save_many(batch)
            except ExchangesRefused as exc:
                for n, error in exc.refused.items():
                    log.error(
                        "history record of request %s refused by the store, dropped: %s", _request_of(batch[n]), error
                    )
                self.dropped += len(exc.refused)
                self.written += len(batch) - len(exc.refused)
            except StoreUnavailable as exc:
                self.store_errors += 1
                if self.degraded is None:
                    log.warning("history store unavailable, queueing records: %s", exc)
                self.degraded = str(exc) or type(exc).__name__
                await asyncio.sleep(_RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)])
                failures += 1
                continue
            except Exception:
                # A record the store rejects must not block every record behind it: find it alone.
                if not await self._one_by_one(batch):
                    await asyncio.sleep(_RETRY_DELAYS[0])
                    continue  # the store went away meanwhile: the batch is retried whole
            else:
                self.written += len(batch)
            if self.degraded is not None:
                log.info("history store is back; %d queued records to write", len(self._queue) - len(batch))
                self.degraded = None
            failures = 0
            queue = self._queue
            for exchange in batch:
                # Not at the head: submit() dropped it (queue full) while it was being written.
                if queue and queue[0] is exchange:
                    queue.popleft()
                    if exchange.conversation:
                        self._forget(exchange)
            async with self._progress:
                self._progress.notify_all()

    async def _one_by_one(self, batch: list[Exchange]) -> bool:
        """Each record on its own, dropping those the store rejects; False if the store is down."""
        for exchange in batch:
            try:
                await self.store.save(exchange)
            except StoreUnavailable:
                return False
            except Exception:
                log.exception("history record could not be written; dropped")
                self.dropped += 1
            else:
                self.written += 1
        return True

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until queued records are written: at shutdown, and in tests."""
        await self._wait_for(lambda: not self._queue, timeout)

    def _forget(self, exchange: Exchange) -> None:
        if exchange.conversation:
            self._pending[exchange.conversation] -= 1
            if self._pending[exchange.conversation] <= 0:
                del self._pending[exchange.conversation]


def _request_of(exchange: Exchange) -> str | None:
    return exchange.completion.request_id if exchange.completion is not None else None


class Turn:
    """One chat request's part in history."""

    __slots__ = (
        "_chat",
        "_history",
        "_messages",
        "_sent",
        "conversation",
        "model",
        "record",
        "request_id",
        "scope",
        "stored",
    )

    def __init__(
        self,
        history: History,
        scope: Scope,
        chat: ChatRequest,
        *,
        model: str,
        request_id: str,
        conversation: str | None,
        stored: list[dict[str, Any]],
        record: bool,
    ) -> None:
        self._history = history
        self._chat = chat
        self.scope = scope
        self.model = model
        self.request_id = request_id
        self.conversation = conversation
        self.stored = stored
        self.record = record
        self._messages: list[dict[str, Any]] | None = None
        self._sent: list[dict[str, Any]] | None = None

    @property
    def active(self) -> bool:
        return self.record or self.conversation is not None

    def body_changes(self) -> dict[str, Any]:
        """What the upstream's body needs: the conversation's history before the request's messages,
        and no ``conversation`` field (no upstream knows this gateway's conversations)."""
        if self.conversation is None:
            return {}
        return {"messages": self._sent_messages(), "conversation": REMOVE}

    def finish(self, reply: Reply) -> None:
        """The relay's end-of-reply hook: build the exchange and queue it. Runs after the client has
        its last byte, so decoding the messages here costs the client nothing."""
        try:
            exchange = self._exchange(reply)
        except Exception:
            log.exception("could not build the history record of request %s", self.request_id)
            return
        if exchange is not None:
            self._history.submit(exchange)

    def _exchange(self, reply: Reply) -> Exchange | None:
        items: list[dict[str, Any]] = []
        if self.conversation is not None and (reply.done or reply.text() or reply.message().get("tool_calls")):
            # A turn whose reply never started is not kept: the client retries it whole.
            new = conversations.new_turn(self.stored, self._request_messages())
            items = conversations.messages_to_items([*new, reply.message()])
        completion = self._completion(reply, self._sent_messages()) if self.record else None
        if completion is None and not items:
            return None
        return Exchange(
            completion=completion,
            conversation=self.conversation if items else None,
            tenant=self.scope.tenant,
            items=items,
        )

    def _completion(self, reply: Reply, messages: list[dict[str, Any]]) -> CompletionRecord:
        chat = self._chat
        user = self.scope.user or self.scope.tenant
        metadata = dict(chat.metadata or {})
        if self.scope.user:
            metadata["user"] = self.scope.user
        choices = reply.choices("cancelled" if reply.error == "cancelled" else "error")
        usage = msgspec.structs.asdict(reply.usage) if reply.usage is not None else None
        return CompletionRecord(
            id=reply.id or f"chatcmpl-{uuid.uuid4().hex}",
            tenant=self.scope.tenant,
            user=user,
            created=reply.created or int(time.time()),
            model=reply.model or self.model,
            messages=messages,
            choices=choices,
            usage=usage,
            metadata=metadata,
            request_id=self.request_id,
        )

    def _sent_messages(self) -> list[dict[str, Any]]:
        """The messages the upstream got: the conversation's window, then the request's own. Built
        once: before forwarding for the body, and reused when the exchange is recorded."""
        if self._sent is None:
            if self.conversation is None:
                self._sent = self._request_messages()
            else:
                settings = self._history.settings
                window = conversations.window(
                    self.stored, max_messages=settings.max_messages, max_tokens=settings.max_tokens
                )
                self._sent = conversations.merge(window, self._request_messages())
        return self._sent

    def _request_messages(self) -> list[dict[str, Any]]:
        if self._messages is None:
            try:
                messages = msgspec.json.decode(self._chat.messages)
            except msgspec.DecodeError:
                messages = []
            self._messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        return self._messages


def new_conversation(scope: Scope, metadata: dict[str, str] | None = None) -> ConversationRecord:
    return ConversationRecord(
        id=conversations.new_id("conv"),
        tenant=scope.tenant,
        user=scope.user or scope.tenant,
        created_at=int(time.time()),
        metadata=metadata or {},
    )
