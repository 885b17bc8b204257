"""History over HTTP, in OpenAI's own shapes, so the ``openai`` SDK reads it unchanged:
Stored Completions (``client.chat.completions.list/retrieve/update/delete``, ``.messages.list``) and
Conversations (``client.conversations...``, ``.items...``), plus ``GET /v1/conversations``, an
extension that lists conversations newest first (``?user=`` narrows to one user).

Who may see what is the store's business (:class:`~gateway.stores.base.Scope`); a record outside the
caller's scope is a 404, exactly like a missing one.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State

from gateway.conversations import normalise_items
from gateway.errors import InvalidRequest, NotFound
from gateway.history import new_conversation, scope_of
from gateway.request import decode_body
from gateway.stores.base import CompletionRecord, ConversationRecord, Item, Order, Scope
from gateway.wire import MetadataUpdate, NewConversation, NewItems, encode

__all__ = ["handlers"]

_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")
_MAX_LIMIT = 100


def _json(payload: Any, status: int = 200) -> Response[bytes]:
    return Response(encode(payload), status_code=status, media_type="application/json")


def _page(request: Request, default_order: Order) -> tuple[str | None, int, Order]:
    query = request.query_params
    after = query.get("after") or None
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise InvalidRequest("`limit` must be an integer.", param="limit", code="invalid_type") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise InvalidRequest(f"`limit` must be between 1 and {_MAX_LIMIT}.", param="limit", code="invalid_value")
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequest("`order` must be 'asc' or 'desc'.", param="order", code="invalid_value")
    return after, limit, order  # type: ignore[return-value]


def _list(data: list[Any], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


# -- stored completions ---------------------------------------------------------------------------


def _completion(record: CompletionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "chat.completion",
        "created": record.created,
        "model": record.model,
        "choices": record.choices,
        "usage": record.usage,
        "metadata": record.metadata,
        "request_id": record.request_id,
    }


async def list_completions(request: Request, state: State) -> Response[bytes]:
    """GET /v1/chat/completions, answered by the route POST shares (gateway/api.py)."""
    after, limit, order = _page(request, "asc")
    metadata = {m.group(1): value for key, value in request.query_params.items() if (m := _METADATA_KEY.match(key))}
    records, more = await state.history.store.list_completions(
        scope_of(request),
        model=request.query_params.get("model") or None,
        metadata=metadata,
        after=after,
        limit=limit,
        order=order,
    )
    return _json(_list([_completion(r) for r in records], more))


async def _find_completion(request: Request, state: State) -> tuple[Scope, CompletionRecord]:
    scope = scope_of(request)
    completion_id = request.path_params["completion_id"]
    record = await state.history.store.get_completion(scope, completion_id)
    if record is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.", param="completion_id")
    return scope, record


@get("/chat/completions/{completion_id:str}")
async def retrieve_completion(request: Request, state: State) -> Response[bytes]:
    _, record = await _find_completion(request, state)
    return _json(_completion(record))


@get("/chat/completions/{completion_id:str}/messages")
async def completion_messages(request: Request, state: State) -> Response[bytes]:
    _, record = await _find_completion(request, state)
    after, limit, order = _page(request, "asc")
    messages = [{"id": f"{record.id}-{i}", "content_parts": None, **m} for i, m in enumerate(record.messages)]
    if order == "desc":
        messages.reverse()
    start = 0
    if after is not None:
        ids = [m["id"] for m in messages]
        start = ids.index(after) + 1 if after in ids else len(messages)
    page = messages[start : start + limit]
    return _json(_list(page, start + limit < len(messages)))


@post("/chat/completions/{completion_id:str}", status_code=200)
async def update_completion(request: Request, state: State) -> Response[bytes]:
    scope, record = await _find_completion(request, state)
    update = decode_body(MetadataUpdate, await request.body())
    updated = await state.history.store.update_completion(scope, record.id, update.metadata or {})
    if updated is None:
        raise NotFound(f"No chat completion found with id '{record.id}'.", param="completion_id")
    return _json(_completion(updated))


@delete("/chat/completions/{completion_id:str}", status_code=200)
async def delete_completion(request: Request, state: State) -> Response[bytes]:
    scope, record = await _find_completion(request, state)
    await state.history.store.delete_completion(scope, record.id)
    return _json({"object": "chat.completion.deleted", "id": record.id, "deleted": True})


# -- conversations --------------------------------------------------------------------------------


def _conversation(record: ConversationRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "conversation", "created_at": record.created_at, "metadata": record.metadata}


def _missing_conversation(conversation_id: str) -> NotFound:
    return NotFound(f"No conversation found with id '{conversation_id}'.", param="conversation_id")


@post("/conversations", status_code=200)
async def create_conversation(request: Request, state: State) -> Response[bytes]:
    body = await request.body()
    new = decode_body(NewConversation, body) if body.strip() else NewConversation()
    record = new_conversation(scope_of(request), new.metadata)
    created = await state.history.store.create_conversation(record, normalise_items(new.items or []))
    return _json(_conversation(created))


@get("/conversations")
async def list_conversations(request: Request, state: State) -> Response[bytes]:
    after, limit, order = _page(request, "desc")
    scope = scope_of(request, request.query_params.get("user") or None)
    records, more = await state.history.store.list_conversations(scope, after=after, limit=limit, order=order)
    return _json(_list([_conversation(r) for r in records], more))


async def _find_conversation(request: Request, state: State) -> tuple[Scope, ConversationRecord]:
    scope = scope_of(request)
    conversation_id = request.path_params["conversation_id"]
    record = await state.history.store.get_conversation(scope, conversation_id)
    if record is None:
        raise _missing_conversation(conversation_id)
    return scope, record


@get("/conversations/{conversation_id:str}")
async def retrieve_conversation(request: Request, state: State) -> Response[bytes]:
    _, record = await _find_conversation(request, state)
    return _json(_conversation(record))


@post("/conversations/{conversation_id:str}", status_code=200)
async def update_conversation(request: Request, state: State) -> Response[bytes]:
    scope, record = await _find_conversation(request, state)
    update = decode_body(MetadataUpdate, await request.body())
    updated = await state.history.store.update_conversation(scope, record.id, update.metadata or {})
    if updated is None:
        raise _missing_conversation(record.id)
    return _json(_conversation(updated))


@delete("/conversations/{conversation_id:str}", status_code=200)
async def delete_conversation(request: Request, state: State) -> Response[bytes]:
    scope, record = await _find_conversation(request, state)
    await state.history.store.delete_conversation(scope, record.id)
    return _json({"id": record.id, "object": "conversation.deleted", "deleted": True})


@get("/conversations/{conversation_id:str}/items")
async def list_items(request: Request, state: State) -> Response[bytes]:
    after, limit, order = _page(request, "desc")
    scope = scope_of(request)
    conversation_id = request.path_params["conversation_id"]
    page = await state.history.store.list_items(scope, conversation_id, after=after, limit=limit, order=order)
    if page is None:
        raise _missing_conversation(conversation_id)
    items, more = page
    return _json(_list(items, more))


@post("/conversations/{conversation_id:str}/items", status_code=200)
async def add_items(request: Request, state: State) -> Response[bytes]:
    new = decode_body(NewItems, await request.body())
    scope = scope_of(request)
    conversation_id = request.path_params["conversation_id"]
    items: list[Item] | None = await state.history.store.add_items(scope, conversation_id, normalise_items(new.items))
    if items is None:
        raise _missing_conversation(conversation_id)
    return _json(_list(items, False))


@get("/conversations/{conversation_id:str}/items/{item_id:str}")
async def retrieve_item(request: Request, state: State) -> Response[bytes]:
    scope = scope_of(request)
    conversation_id, item_id = request.path_params["conversation_id"], request.path_params["item_id"]
    item = await state.history.store.get_item(scope, conversation_id, item_id)
    if item is None:
        raise NotFound(f"No item found with id '{item_id}' in conversation '{conversation_id}'.", param="item_id")
    return _json(item)


@delete("/conversations/{conversation_id:str}/items/{item_id:str}", status_code=200)
async def delete_item(request: Request, state: State) -> Response[bytes]:
    scope = scope_of(request)
    conversation_id, item_id = request.path_params["conversation_id"], request.path_params["item_id"]
    record = await state.history.store.delete_item(scope, conversation_id, item_id)
    if record is None:
        raise NotFound(f"No item found with id '{item_id}' in conversation '{conversation_id}'.", param="item_id")
    return _json(_conversation(record))


handlers = [
    retrieve_completion,
    completion_messages,
    update_completion,
    delete_completion,
    create_conversation,
    list_conversations,
    retrieve_conversation,
    update_conversation,
    delete_conversation,
    list_items,
    add_items,
    retrieve_item,
    delete_item,
]
"""Served under ``/v1``. :func:`list_completions` is not among them: ``/v1/chat/completions`` is one
route, gateway/api.py's, which answers GET with it."""
