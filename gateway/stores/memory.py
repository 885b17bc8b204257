"""History kept in this process's memory: the store when no Redis is configured (one process, lost on
restart).

asyncio runs one coroutine at a time and no method here awaits, so each one is atomic, the way a Lua
script is in Redis. The two stores pass the same contract suite, so the details below copy Redis's:

- Stored values are copies made by a JSON round trip, and so are the values handed out: a caller
  mutating a returned record changes nothing stored, and what cannot be stored as JSON fails here too.
- A record lives ``ttl_seconds`` after its last write. An expired record is absent from the moment it
  expires; a sweep, at most once per TTL and run by writes, drops the dead ones so memory stays bounded.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from gateway.stores.base import CompletionRecord, ConversationRecord, Exchange, Item, Order, Scope

__all__ = ["MemoryStore"]

_T = TypeVar("_T")


def _copy(value: _T) -> _T:
    return msgspec.json.decode(msgspec.json.encode(value), type=type(value))


@dataclass(slots=True)
class _Completion:
    record: CompletionRecord
    expires: float | None


@dataclass(slots=True)
class _Conversation:
    record: ConversationRecord
    items: list[Item]
    expires: float | None


@dataclass(slots=True)
class _Pointer:
    conversation: str
    expires: float | None


def _page(
    ordered: Iterable[_T],
    ident: Callable[[_T], Any],
    after: str | None,
    limit: int,
    match: Callable[[_T], bool] | None = None,
) -> tuple[list[_T], bool]:
    """The page after ``after`` (by id) of an ordered sequence. ``after`` keeps its place even when it
    does not ``match`` (it is a position, as in Redis's index); one that is not there gives nothing."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    rest = iter(ordered)
    if after is not None:
        for value in rest:
            if ident(value) == after:
                break
        else:
            return [], False
    if match is not None:
        rest = filter(match, rest)
    page = list(itertools.islice(rest, limit + 1))
    return page[:limit], len(page) > limit


def _matches(record: CompletionRecord, model: str | None, metadata: dict[str, str] | None) -> bool:
    if model is not None and record.model != model:
        return False
    return not metadata or all(record.metadata.get(key) == value for key, value in metadata.items())


class MemoryStore:
    def __init__(
        self, *, ttl_seconds: float | None = None, max_items: int = 1000, clock: Callable[[], float] = time.time
    ) -> None:
        self._ttl = ttl_seconds
        self._max_items = max_items
        self._clock = clock
        self._completions: dict[str, dict[str, _Completion]] = {}
        self._conversations: dict[str, dict[str, _Conversation]] = {}
        self._defaults: dict[Scope, _Pointer] = {}
        self._seq = itertools.count(1)
        self._next_sweep = clock() + ttl_seconds if ttl_seconds is not None else float("inf")

    async def ping(self) -> None:
        return None

    async def save_many(self, exchanges: list[Exchange]) -> None:
        for exchange in exchanges:
            await self.save(exchange)

    async def save(self, exchange: Exchange) -> None:
        self._sweep()
        completion = exchange.completion
        if completion is not None:
            if self._completion(Scope(completion.tenant), completion.id) is not None:
                # Already stored: the caller retried a write whose answer it lost. The first write
                # was whole (items included), so applying this one would add the turn twice.
                return
            record = _copy(msgspec.structs.replace(completion, seq=next(self._seq)))
            self._completions.setdefault(record.tenant, {})[record.id] = _Completion(record, self._expiry())
        tenant = exchange.tenant or (completion.tenant if completion is not None else "")
        if exchange.conversation is not None and exchange.items:
            entry = self._conversation(Scope(tenant), exchange.conversation)
            if entry is not None:
                self._append(entry, exchange.items)

    # Stored completions ---------------------------------------------------------------------------

    async def get_completion(self, scope: Scope, completion_id: str) -> CompletionRecord | None:
        entry = self._completion(scope, completion_id)
        return _copy(entry.record) if entry is not None else None

    async def list_completions(
        self,
        scope: Scope,
        *,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Order = "asc",
    ) -> tuple[list[CompletionRecord], bool]:
        visible = self._visible(self._completions, scope)
        ordered = sorted(visible, key=lambda r: (r.created, r.seq), reverse=order == "desc")
        page, more = _page(ordered, _id, after, limit, lambda r: _matches(r, model, metadata))
        return [_copy(record) for record in page], more

    async def update_completion(
        self, scope: Scope, completion_id: str, metadata: dict[str, str]
    ) -> CompletionRecord | None:
        entry = self._completion(scope, completion_id)
        if entry is None:
            return None
        entry.record = msgspec.structs.replace(entry.record, metadata=dict(metadata))
        entry.expires = self._expiry()
        return _copy(entry.record)

    async def delete_completion(self, scope: Scope, completion_id: str) -> bool:
        if self._completion(scope, completion_id) is None:
            return False
        del self._completions[scope.tenant][completion_id]
        return True

    # Conversations --------------------------------------------------------------------------------

    async def create_conversation(self, record: ConversationRecord, items: list[Item]) -> ConversationRecord:
        self._sweep()
        return _copy(self._create(record, items).record)

    async def get_conversation(self, scope: Scope, conversation_id: str) -> ConversationRecord | None:
        entry = self._conversation(scope, conversation_id)
        return _copy(entry.record) if entry is not None else None

    async def update_conversation(
        self, scope: Scope, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord | None:
        entry = self._conversation(scope, conversation_id)
        if entry is None:
            return None
        entry.record = msgspec.structs.replace(entry.record, metadata=dict(metadata))
        entry.expires = self._expiry()
        return _copy(entry.record)

    async def delete_conversation(self, scope: Scope, conversation_id: str) -> bool:
        if self._conversation(scope, conversation_id) is None:
            return False
        del self._conversations[scope.tenant][conversation_id]
        return True

    async def list_conversations(
        self, scope: Scope, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[ConversationRecord], bool]:
        visible = self._visible(self._conversations, scope)
        ordered = sorted(visible, key=lambda r: (r.created_at, r.seq), reverse=order == "desc")
        page, more = _page(ordered, _id, after, limit)
        return [_copy(record) for record in page], more

    async def add_items(self, scope: Scope, conversation_id: str, items: list[Item]) -> list[Item] | None:
        self._sweep()
        entry = self._conversation(scope, conversation_id)
        if entry is None:
            return None
        if items:
            self._append(entry, items)
        return [_copy(item) for item in items]

    async def list_items(
        self, scope: Scope, conversation_id: str, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[Item], bool] | None:
        entry = self._conversation(scope, conversation_id)
        if entry is None:
            return None
        ordered = entry.items if order == "asc" else reversed(entry.items)
        page, more = _page(ordered, _item_id, after, limit)
        return [_copy(item) for item in page], more

    async def get_item(self, scope: Scope, conversation_id: str, item_id: str) -> Item | None:
        entry = self._conversation(scope, conversation_id)
        if entry is None:
            return None
        return next((_copy(item) for item in entry.items if _item_id(item) == item_id), None)

    async def delete_item(self, scope: Scope, conversation_id: str, item_id: str) -> ConversationRecord | None:
        entry = self._conversation(scope, conversation_id)
        if entry is None:
            return None
        for index, item in enumerate(entry.items):
            if _item_id(item) == item_id:
                del entry.items[index]
                entry.expires = self._expiry()
                return _copy(entry.record)
        return None

    async def items(self, scope: Scope, conversation_id: str) -> list[Item] | None:
        entry = self._conversation(scope, conversation_id)
        return [_copy(item) for item in entry.items] if entry is not None else None

    async def default_conversation(self, scope: Scope, new: ConversationRecord) -> ConversationRecord:
        if not scope.sees(new.tenant, new.user):
            raise ValueError(f"conversation of {new.tenant}/{new.user} cannot be the default of {scope}")
        self._sweep()
        pointer = self._defaults.get(scope)
        if pointer is not None and self._alive(pointer.expires):
            entry = self._conversation(scope, pointer.conversation)
            if entry is not None:
                pointer.expires = self._expiry()
                return _copy(entry.record)
        entry = self._create(new, [])
        self._defaults[scope] = _Pointer(entry.record.id, self._expiry())
        return _copy(entry.record)

    # Internals ------------------------------------------------------------------------------------

    def _expiry(self) -> float | None:
        return self._clock() + self._ttl if self._ttl is not None else None

    def _alive(self, expires: float | None) -> bool:
        return expires is None or self._clock() < expires

    def _completion(self, scope: Scope, completion_id: str) -> _Completion | None:
        entry = self._completions.get(scope.tenant, {}).get(completion_id)
        if entry is None or not self._alive(entry.expires):
            return None
        return entry if scope.sees(entry.record.tenant, entry.record.user) else None

    def _conversation(self, scope: Scope, conversation_id: str) -> _Conversation | None:
        entry = self._conversations.get(scope.tenant, {}).get(conversation_id)
        if entry is None or not self._alive(entry.expires):
            return None
        return entry if scope.sees(entry.record.tenant, entry.record.user) else None

    def _visible(self, entries: dict[str, dict[str, Any]], scope: Scope) -> list[Any]:
        return [
            entry.record
            for entry in entries.get(scope.tenant, {}).values()
            if self._alive(entry.expires) and scope.sees(entry.record.tenant, entry.record.user)
        ]

    def _create(self, record: ConversationRecord, items: list[Item]) -> _Conversation:
        existing = self._conversation(Scope(record.tenant), record.id)
        if existing is not None:
            # The same id again is a retried create: keep the first (Redis's script does the same).
            return existing
        stored = _copy(msgspec.structs.replace(record, seq=next(self._seq)))
        entry = _Conversation(stored, [], self._expiry())
        self._conversations.setdefault(stored.tenant, {})[stored.id] = entry
        self._append(entry, items)
        return entry

    def _append(self, entry: _Conversation, items: list[Item]) -> None:
        entry.items.extend(_copy(item) for item in items)
        if len(entry.items) > self._max_items:
            del entry.items[: len(entry.items) - self._max_items]
        entry.expires = self._expiry()

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        assert self._ttl is not None  # otherwise _next_sweep is infinite
        self._next_sweep = now + self._ttl
        for table in (self._completions, self._conversations):
            for tenant, entries in list(table.items()):
                for key in [key for key, entry in entries.items() if not self._alive(entry.expires)]:
                    del entries[key]
                if not entries:
                    del table[tenant]
        for key in [key for key, pointer in self._defaults.items() if not self._alive(pointer.expires)]:
            del self._defaults[key]


def _id(record: Any) -> str:
    return record.id


def _item_id(item: Item) -> Any:
    return item.get("id")
