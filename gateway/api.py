"""The OpenAI-compatible endpoints. Each handler reads as the pipeline it runs:
parse -> route -> forward (upstream and relay)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream

from gateway.errors import ModelNotFound
from gateway.history import new_conversation, scope_of
from gateway.relay import forward
from gateway.reply import Reply
from gateway.request import decode_body, parse_chat, parse_routed, request_id
from gateway.routing import Route, listed_models, resolve
from gateway.stores.base import Scope
from gateway.wire import LegacyChat, ModelCard, ModelList, encode, rewrite_fields

__all__ = ["handlers", "legacy_chat"]


@post("/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response[bytes] | Stream:
    return await _chat(request, state, await request.body())


async def _chat(request: Request, state: State, body: bytes) -> Response[bytes] | Stream:
    chat = parse_chat(body)
    route = resolve(chat.model, state.backends, state.settings.aliases)
    rid = request_id(request)
    scope = scope_of(request, chat.user or chat.safety_identifier)
    turn = await state.history.begin(scope, chat, model=route.model, request_id=rid)
    return await forward(
        route,
        "/chat/completions",
        _for_backend(body, route, turn.body_changes()),
        request_id=rid,
        stream=bool(chat.stream),
        timeouts=state.settings.timeouts,
        reply=Reply(),
        on_end=turn.finish if turn.active else None,
    )


async def _relay_as_is(request: Request, state: State, path: str) -> Response[bytes] | Stream:
    body = await request.body()
    routed = parse_routed(body)
    route = resolve(routed.model, state.backends, state.settings.aliases)
    return await forward(
        route,
        path,
        _for_backend(body, route),
        request_id=request_id(request),
        stream=bool(routed.stream),
        timeouts=state.settings.timeouts,
    )


@post("/completions", status_code=200)
async def completions(request: Request, state: State) -> Response[bytes] | Stream:
    return await _relay_as_is(request, state, "/completions")


@post("/embeddings", status_code=200)
async def embeddings(request: Request, state: State) -> Response[bytes] | Stream:
    return await _relay_as_is(request, state, "/embeddings")


@post("/responses", status_code=200)
async def responses(request: Request, state: State) -> Response[bytes] | Stream:
    return await _relay_as_is(request, state, "/responses")


@get("/models")
async def list_models(state: State) -> Response[bytes]:
    cards = [
        ModelCard(id=name, created=state.started_at, owned_by=owner)
        for name, owner in listed_models(state.backends, state.settings.aliases)
    ]
    return Response(encode(ModelList(data=cards)), media_type="application/json")


@get("/models/{model_id:path}")
async def retrieve_model(request: Request, state: State) -> Response[bytes]:
    # Read from the scope rather than the signature: model ids contain slashes ("org/model").
    model_id = str(request.path_params["model_id"]).lstrip("/")
    for name, owner in listed_models(state.backends, state.settings.aliases):
        if name == model_id:
            return Response(
                encode(ModelCard(id=name, created=state.started_at, owned_by=owner)), media_type="application/json"
            )
    raise ModelNotFound(model_id)


@post("/chat", status_code=200)
async def legacy_chat(request: Request, state: State) -> Response[bytes] | Stream:
    """The route of the service this gateway replaces: one message from one user, answered as a stream
    of OpenAI chunks, in that user's default conversation (so its history is kept as any other)."""
    legacy = decode_body(LegacyChat, await request.body())
    model = legacy.model or next(iter(listed_models(state.backends, state.settings.aliases)), ("", ""))[0]
    scope = Scope(scope_of(request).tenant, legacy.user_id)
    conversation = await state.history.store.default_conversation(scope, new_conversation(scope))
    body = encode(
        {
            "model": model,
            "messages": [{"role": "user", "content": legacy.message}],
            "stream": True,
            "user": legacy.user_id,
            "conversation": conversation.id,
        }
    )
    return await _chat(request, state, body)


def _for_backend(body: bytes, route: Route, changes: dict[str, Any] | None = None) -> bytes:
    """The body the backend gets: the client's bytes, with an alias replaced by the served name and
    whatever else a step changed. Untouched fields keep their exact bytes."""
    changes = dict(changes or {})
    if route.aliased:
        changes["model"] = route.served
    return rewrite_fields(body, changes) if changes else body


handlers = [chat_completions, completions, embeddings, responses, list_models, retrieve_model]
"""Served under ``/v1``."""
