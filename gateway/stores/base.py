"""What a history store keeps, and the interface both stores (memory, Redis) implement.

Every record has an owner: a tenant and an end user. A :class:`Scope` is who is asking: a tenant,
and optionally one user of it. Nothing is visible across tenants; inside a tenant a scope without a
user sees every record, a scope with a user only that user's. Records outside the scope behave
exactly as absent ones (the API answers 404 for both).

Pagination follows OpenAI's cursor lists: ``after`` is the id of the last record of the previous
page, ``order`` is by creation time (ties by insertion), ``limit`` caps the page, and the second
value returned says whether more records follow.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

import msgspec

__all__ = [
    "CompletionRecord",
    "ConversationRecord",
    "Exchange",
    "HistoryStore",
    "Item",
    "Order",
    "Scope",
    "StoreUnavailable",
]

Order = Literal["asc", "desc"]
Item = dict[str, Any]
"""A conversation item in OpenAI's Conversations shape, with its ``id``:
``{"type": "message", "id": "msg_...", "role": "user", "content": [{"type": "input_text", "text": ...}],
"status": "completed"}``, or ``function_call`` / ``function_call_output`` items."""


class Scope(NamedTuple):
    tenant: str
    user: str | None = None

    def sees(self, tenant: str, user: str) -> bool:
        return tenant == self.tenant and (self.user is None or user == self.user)


class CompletionRecord(msgspec.Struct, kw_only=True):
    """One recorded chat completion: the request's messages and the reply as the client got it."""

    id: str
    tenant: str
    user: str
    created: int
    """Unix seconds, as OpenAI's ``created``."""
    model: str
    messages: list[dict[str, Any]]
    """The messages the upstream received (history included), for ``/messages``."""
    choices: list[dict[str, Any]]
    """``{"index", "message", "finish_reason", "logprobs"}``, OpenAI's ``chat.completion`` choices."""
    usage: dict[str, Any] | None = None
    metadata: dict[str, str] = {}
    request_id: str | None = None
    seq: int = 0
    """Orders records created in the same second; set by the store."""


class ConversationRecord(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    user: str
    created_at: int
    metadata: dict[str, str] = {}
    seq: int = 0
    """Orders conversations created in the same second; set by the store."""


class Exchange(msgspec.Struct, kw_only=True):
    """Everything one chat exchange writes, written atomically (all or nothing): its completion
    record, and the turn it adds to a conversation."""

    completion: CompletionRecord | None = None
    conversation: str | None = None
    tenant: str = ""
    """The tenant of both; "" for the completion's."""
    items: list[Item] = []


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis down). Callers decide: queue a write, or answer 503."""


class ExchangesRefused(Exception):
    """:meth:`HistoryStore.save_many` wrote every exchange but these, which the store refused and
    would refuse again (a Redis key of the wrong type): their errors, by their index in the batch."""

    def __init__(self, refused: dict[int, Exception]) -> None:
        super().__init__(f"the store refused {len(refused)} exchange(s): {next(iter(refused.values()))}")
        self.refused = refused


class HistoryStore(Protocol):
    """Both stores pass ``tests/test_stores.py``, the one contract suite run against each."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot serve."""

    async def save(self, exchange: Exchange) -> None:
        """Write an exchange atomically. Items are appended to the conversation in order, right after
        each other (a concurrent exchange never lands between them), the conversation is capped to its
        newest ``max_items``, and everything written gets the store's TTL. Items for a conversation
        that no longer exists are dropped."""

    async def save_many(self, exchanges: list[Exchange]) -> None:
        """:meth:`save` for several exchanges, in order, in as few round trips as the store can; each
        exchange is still atomic on its own. Raises :class:`ExchangesRefused` when the store refused
        some and wrote the rest; any other failure may leave some written. An exchange with a
        completion, saved again, changes nothing (the completion id guards it); one with only items
        would append them twice, as a retried :meth:`save` would."""

    # Stored completions ---------------------------------------------------------------------------

    async def get_completion(self, scope: Scope, completion_id: str) -> CompletionRecord | None: ...

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
        """``metadata`` matches records whose metadata has every given key with that value."""
        ...

    async def update_completion(
        self, scope: Scope, completion_id: str, metadata: dict[str, str]
    ) -> CompletionRecord | None:
        """Replace the record's metadata; None when not visible."""
        ...

    async def delete_completion(self, scope: Scope, completion_id: str) -> bool: ...

    # Conversations --------------------------------------------------------------------------------

    async def create_conversation(self, record: ConversationRecord, items: list[Item]) -> ConversationRecord:
        """Store a new conversation with its first items (atomically)."""
        ...

    async def get_conversation(self, scope: Scope, conversation_id: str) -> ConversationRecord | None: ...

    async def update_conversation(
        self, scope: Scope, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord | None: ...

    async def delete_conversation(self, scope: Scope, conversation_id: str) -> bool:
        """Delete the conversation and all its items."""
        ...

    async def list_conversations(
        self, scope: Scope, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[ConversationRecord], bool]: ...

    async def add_items(self, scope: Scope, conversation_id: str, items: list[Item]) -> list[Item] | None:
        """Append items (atomically, together); None when the conversation is not visible."""
        ...

    async def list_items(
        self, scope: Scope, conversation_id: str, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[Item], bool] | None: ...

    async def get_item(self, scope: Scope, conversation_id: str, item_id: str) -> Item | None: ...

    async def delete_item(self, scope: Scope, conversation_id: str, item_id: str) -> ConversationRecord | None:
        """Remove one item; returns the conversation, or None when it or the item is not visible."""
        ...

    async def items(self, scope: Scope, conversation_id: str) -> list[Item] | None:
        """Every item, oldest first (what server-side memory reads); None when not visible."""
        ...

    async def default_conversation(self, scope: Scope, new: ConversationRecord) -> ConversationRecord:
        """The scope's default conversation (the ``/chat`` route's), creating ``new`` as it when there
        is none yet. Atomic: two concurrent first calls get the same conversation."""
        ...
