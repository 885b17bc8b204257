"""The OpenAI-compatible endpoints. Each handler reads as the pipeline it runs:
parse -> route -> forward (upstream and relay)."""

from __future__ import annotations

from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.response import Stream

from gateway.errors import ModelNotFound
from gateway.relay import forward
from gateway.reply import Reply
from gateway.request import parse_chat, parse_routed, request_id
from gateway.routing import Route, listed_models, resolve
from gateway.wire import ModelCard, ModelList, encode, rewrite_fields

__all__ = ["router"]


@post("/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response[bytes] | Stream:
    body = await request.body()
    chat = parse_chat(body)
    route = resolve(chat.model, state.backends, state.settings.aliases)
    return await forward(
        route,
        "/chat/completions",
        _for_backend(body, route),
        request_id=request_id(request),
        stream=bool(chat.stream),
        timeouts=state.settings.timeouts,
        reply=Reply(),
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


def _for_backend(body: bytes, route: Route) -> bytes:
    """The body the backend gets: the client's bytes, with an alias replaced by the served name."""
    return rewrite_fields(body, {"model": route.served}) if route.aliased else body


router = Router(
    path="/v1",
    route_handlers=[chat_completions, completions, embeddings, responses, list_models, retrieve_model],
)
