"""The OpenAI-compatible endpoints. Each handler reads as the pipeline it runs:
parse -> access -> route -> history -> limits -> forward (upstream and relay) -> record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Request, Response, asgi, get, post
from litestar.datastructures import State
from litestar.exceptions import MethodNotAllowedException
from litestar.handlers import ASGIRouteHandler
from litestar.response import Stream
from litestar.types import ASGIApp, Receive, Send
from litestar.types import Scope as LitestarScope

from gateway import history_api
from gateway.auth import Principal, authenticate_scope
from gateway.errors import GatewayError, ModelNotFound, RateLimited, error_response
from gateway.history import Turn, new_conversation, scope_of
from gateway.limits import Admission, texts
from gateway.relay import Resume, StreamRelay, forward
from gateway.reply import Reply
from gateway.request import decode_body, header, parse_chat, parse_routed, read_body, request_id
from gateway.routing import Route, listed_models, resolve
from gateway.stores.base import Scope
from gateway.wire import REMOVE, LegacyChat, ModelCard, ModelList, encode

__all__ = ["Dispatch", "handlers", "legacy_chat"]


def principal_of(scope: LitestarScope) -> Principal:
    return scope["state"]["principal"]


def _route(state: State, principal: Principal, model: str) -> Route:
    # A model the key may not use is "not found", so a key learns nothing about what else is served.
    if not principal.may_use(model):
        raise ModelNotFound(model)
    return resolve(model, state.backends, state.settings.aliases, state.fallbacks)


def _note(scope: LitestarScope, route: Route, *, stream: bool, user: str | None = None) -> dict[str, Any]:
    """What the request is about, kept in its scope for its access line, metrics and span
    (gateway/observe.py); ``_forward`` adds the reply."""
    noted: dict[str, Any] = scope["state"]
    noted.update(model=route.model, backend=route.targets[0].backend.name, stream=stream, user=user)
    return noted


Answer = Callable[[LitestarScope, State, bytes], Awaitable[Response[bytes] | Stream]]
Listing = Callable[[Request, State], Awaitable[Response[bytes]]]


def _endpoint(path: str, answer: Answer, listing: Listing | None = None) -> ASGIRouteHandler:
    """A hot route as an ASGI callable, mounted as a Litestar ASGI route and reached straight from
    :class:`Dispatch`. What Litestar does for a route handler is done here: the method check, the
    router's authentication hook, the body limit, rendering errors (CORS preflights never get here).
    Against a route handler taking only the request and returning a
    :class:`~gateway.responses.WholeReply`, this measured 273 -> 250 us of CPU a request in-process
    (README, Performance). ``listing`` answers GET, for the path it shares with the stored
    completions' listing.

    A POST's answer takes the ASGI scope: Litestar's ``Request`` costs about 14,700 instructions to
    make (its connection state alone 8,300), for nothing these handlers read. One is made for GET's
    listing and for rendering an error."""
    allow = "GET, OPTIONS, POST" if listing is not None else "OPTIONS, POST"

    async def endpoint(scope: LitestarScope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        request: Request | None = None
        response: Response[bytes] | Stream
        try:
            if method != "POST" and not (method == "GET" and listing is not None):
                raise MethodNotAllowedException(headers={"allow": allow})
            state = scope["litestar_app"].state
            await authenticate_scope(scope, state.auth)
            if method == "GET":
                response = await listing(request := Request(scope, receive, send), state)  # type: ignore[misc]
            else:
                body = await read_body(scope, receive, state.settings.server.max_body_size)
                response = await answer(scope, state, body)
        except Exception as exc:
            # Rendered here, as Litestar's exception handler would: Dispatch calls this past Litestar.
            response = error_response(request or Request(scope, receive, send), exc)
        # Neither the gateway's replies nor Litestar's Response read the request here.
        await response.to_asgi_response(None, request)(scope, receive, send)  # type: ignore[arg-type]

    endpoint.__name__ = endpoint.__qualname__ = f"endpoint_{path.strip('/').replace('/', '_')}"
    # copy_scope=False: what the handler notes in the scope's state is read by gateway/observe.py.
    return asgi(path, copy_scope=False)(endpoint)


class Dispatch:
    """In front of Litestar's router: a request for one of the hot routes' exact paths goes straight
    to its ASGI callable, anything else (other paths, a trailing slash, a ``root_path`` prefix) to
    Litestar, which routes it there too. Litestar's routing and exception middleware around an ASGI
    route cost about 8% of a relayed request's instructions (README, Performance). Not used with
    CORS, whose middleware Litestar keeps in that path."""

    __slots__ = ("_endpoints", "_router")

    def __init__(self, router: ASGIApp, prefix: str) -> None:
        self._router = router
        self._endpoints = {
            prefix + path: handler.fn
            for handler in handlers
            if isinstance(handler, ASGIRouteHandler)
            for path in handler.paths
        }

    async def __call__(self, scope: LitestarScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self._endpoints.get(scope["path"])
            if endpoint is not None:
                scope["path_template"] = scope["path"]  # as Litestar notes it, for gateway/observe.py
                await endpoint(scope, receive, send)
                return
        await self._router(scope, receive, send)


async def _chat(asgi: LitestarScope, state: State, body: bytes) -> Response[bytes] | Stream:
    chat = parse_chat(body)
    principal = principal_of(asgi)
    route = _route(state, principal, chat.model)
    noted = _note(asgi, route, stream=bool(chat.stream), user=chat.user or chat.safety_identifier)
    rid = request_id(asgi)
    scope = scope_of(asgi, chat.user or chat.safety_identifier)
    turn = await state.history.begin(scope, chat, model=route.model, request_id=rid)
    changes = turn.body_changes()
    stream = bool(chat.stream)
    if chat.background is not None:
        changes["background"] = REMOVE  # the gateway's to act on, not the upstream's
    resume: Resume | None = None
    if stream and (
        turn.conversation is not None
        or chat.background
        or (header(asgi, b"x-resumable") or "").lower() == "true"
        or state.settings.resumable.always
    ):

        async def resume(relay: StreamRelay, first: list[bytes]) -> AsyncIterator[bytes]:
            return await state.generations.start(relay, first, scope)

    client_wants_usage = bool(chat.stream_options and chat.stream_options.get("include_usage"))
    hide_usage = stream and state.accounting and not client_wants_usage
    if hide_usage:
        # Streamed tokens are only counted if the upstream reports them.
        changes["stream_options"] = {**(chat.stream_options or {}), "include_usage": True}
    reserve = (len(chat.messages) + 3) // 4 + (chat.max_completion_tokens or chat.max_tokens or state.default_tokens)
    admission = await _admit(state, principal, rid, reserve)
    return await _forward(
        state,
        route,
        "/chat/completions",
        body,
        rid,
        stream,
        principal,
        admission,
        changes=changes,
        turn=turn,
        hide_usage=hide_usage,
        noted=noted,
        resume=resume,
    )


def _relay_as_is(path: str) -> Answer:
    async def relay(scope: LitestarScope, state: State, body: bytes) -> Response[bytes] | Stream:
        return await _relay_routed(scope, state, path, body)

    return relay


async def _relay_routed(scope: LitestarScope, state: State, path: str, body: bytes) -> Response[bytes] | Stream:
    routed = parse_routed(body)
    principal = principal_of(scope)
    route = _route(state, principal, routed.model)
    noted = _note(scope, route, stream=bool(routed.stream))
    rid = request_id(scope)
    reserve = (len(body) + 3) // 4 + (routed.max_tokens or routed.max_output_tokens or 0)
    admission = await _admit(state, principal, rid, reserve)
    return await _forward(state, route, path, body, rid, bool(routed.stream), principal, admission, noted=noted)


async def _admit(state: State, principal: Principal, rid: str, tokens: int) -> Admission | None:
    if not principal.limits.any:
        return None
    window = state.settings.limits.window
    try:
        limit_state = await state.limiter.admit(principal.key_id, principal.limits, rid, tokens, window)
    except RateLimited:
        state.metrics.rate_limited(principal.name)
        raise
    return Admission(state.limiter, principal.key_id, principal.limits, rid, tokens, window, limit_state)


async def _forward(
    state: State,
    route: Route,
    path: str,
    body: bytes,
    rid: str,
    stream: bool,
    principal: Principal,
    admission: Admission | None,
    *,
    changes: dict[str, Any] | None = None,
    turn: Turn | None = None,
    hide_usage: bool = False,
    noted: dict[str, Any] | None = None,
    resume: Resume | None = None,
) -> Response[bytes] | Stream:
    headers = admission.headers if admission is not None else None
    reply = Reply()
    reply.keep_message = (turn is not None and turn.active) or state.settings.logging.log_bodies
    if noted is not None:
        noted["reply"] = reply
    span = state.tracing.upstream(route.model, path, route.targets[0].backend.name)

    async def finish(reply: Reply) -> None:
        """After the reply: charge its real tokens, count its usage, record it."""
        span.end(reply)
        usage = reply.usage
        if admission is not None:
            admission.settle(usage.prompt_tokens + usage.completion_tokens if usage else None)
        if state.accounting:
            state.usage.add(
                principal.key_id,
                principal.name,
                route.model,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
            )
        if turn is not None and turn.active:
            turn.finish(reply)

    try:
        with span.current():  # the upstream request carries this span's traceparent
            return await forward(
                route,
                path,
                body,
                request_id=rid,
                stream=stream,
                settings=state.settings,
                changes=changes,
                reply=reply,
                on_end=finish,
                hide_usage=hide_usage,
                headers=headers,
                resume=resume,
            )
    except GatewayError as exc:
        if admission is not None:
            admission.settle(0)  # nothing was generated: give the tokens back, free the slot
            exc.headers = {**texts(admission.headers), **exc.headers}
        raise


chat_completions = _endpoint("/chat/completions", _chat, history_api.list_completions)
completions = _endpoint("/completions", _relay_as_is("/completions"))
embeddings = _endpoint("/embeddings", _relay_as_is("/embeddings"))
responses = _endpoint("/responses", _relay_as_is("/responses"))


def _visible_models(request: Request, state: State) -> list[tuple[str, str]]:
    principal = principal_of(request.scope)
    return [
        (name, owner)
        for name, owner in listed_models(state.backends, state.settings.aliases)
        if principal.may_use(name)
    ]


@get("/models")
async def list_models(request: Request, state: State) -> Response[bytes]:
    cards = [
        ModelCard(id=name, created=state.started_at, owned_by=owner) for name, owner in _visible_models(request, state)
    ]
    return Response(encode(ModelList(data=cards)), media_type="application/json")


@get("/models/{model_id:path}")
async def retrieve_model(request: Request, state: State) -> Response[bytes]:
    # Read from the scope rather than the signature: model ids contain slashes ("org/model").
    model_id = str(request.path_params["model_id"]).lstrip("/")
    for name, owner in _visible_models(request, state):
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
    model = legacy.model or next(iter(_visible_models(request, state)), ("", ""))[0]
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
    return await _chat(request.scope, state, body)


handlers = [chat_completions, completions, embeddings, responses, list_models, retrieve_model]
"""Served under ``/v1``."""
