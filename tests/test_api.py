"""The app in-process: Litestar's test client in front, the mock backend or pytest-httpx behind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio
from litestar.routes import ASGIRoute, HTTPRoute
from litestar.testing import AsyncTestClient
from pytest_httpx import HTTPXMock

from gateway.api import Dispatch
from gateway.app import AppState, create_app
from gateway.errors import ClientGone, PayloadTooLarge, render
from gateway.request import read_body
from gateway.settings import BackendSettings, KeySettings, RetrySettings, ServerSettings, Settings
from tests.conftest import free_port

UP = "http://upstream/v1"


def settings(**overrides: object) -> Settings:
    base = dict(
        backends=[
            BackendSettings(name="mock", kind="mock", models=["mock"]),
            BackendSettings(name="up", kind="vllm", base_url=UP, models=["org/served", "up-model"]),
        ],
        aliases={"fast": "org/served", "ghost": "nowhere"},
        # One attempt: pytest-httpx answers each request once; retries are tested end to end.
        retries=RetrySettings(max_attempts=1),
    )
    return Settings(**(base | overrides))  # type: ignore[arg-type]


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    async with httpx.AsyncClient() as http, AsyncTestClient(app=create_app(settings(), http=http)) as test_client:
        yield test_client


def chat(model: str = "mock", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello gateway"}], **extra}


def sse_data(text: str) -> list[str]:
    return [line[6:] for event in text.split("\n\n") for line in event.split("\n") if line.startswith("data: ")]


async def test_chat_is_200_with_request_id(client: AsyncTestClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat(max_tokens=4))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "hello gateway lorem ipsum"
    assert body["usage"]["completion_tokens"] == 4
    assert len(response.headers["x-request-id"]) == 32


async def test_client_request_id_is_echoed_and_sent_upstream(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{UP}/chat/completions", json={"id": "x", "choices": []})
    response = await client.post("/v1/chat/completions", json=chat("up-model"), headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert httpx_mock.get_request().headers["x-request-id"] == "abc-123"  # type: ignore[union-attr]


async def test_unsafe_request_id_is_replaced(client: AsyncTestClient) -> None:
    response = await client.get("/health", headers={"x-request-id": "a b\tc"})
    assert response.headers["x-request-id"] != "a b\tc"


async def test_stream_headers_and_events(client: AsyncTestClient) -> None:
    payload = chat(stream=True, n=2, max_tokens=3, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        text = (await response.aread()).decode()
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    for index in (0, 1):
        content = "".join(
            c["choices"][0]["delta"].get("content", "")
            for c in chunks
            if c["choices"] and c["choices"][0]["index"] == index
        )
        assert content == "hello gateway lorem"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_unknown_fields_reach_upstream_byte_for_byte(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{UP}/chat/completions", json={"id": "x", "choices": []})
    raw = (
        b'{"model": "up-model", "messages": [{"role":"user","content":"x"}], "top_k": 7, '
        b'"guided_json": {"type": "object"}, "temperature": 1.50, "tools": [{"type":"function"}]}'
    )
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert httpx_mock.get_request().content == raw  # type: ignore[union-attr]


async def test_alias_rewrites_only_the_model(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{UP}/chat/completions", json={"id": "x", "choices": []})
    raw = b'{"model":"fast","temperature":1.50,"messages":[{"role":"user","content":"model"}],"top_k":7}'
    await client.post("/v1/chat/completions", content=raw)
    sent = httpx_mock.get_request().content  # type: ignore[union-attr]
    assert sent == b'{"model":"org/served","temperature":1.50,"messages":[{"role":"user","content":"model"}],"top_k":7}'


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"model": "mock", "messages": [', 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        (b'{"messages": []}', 400, "model", "missing_required_parameter"),
        (b'{"model": 42, "messages": []}', 400, "model", "invalid_type"),
        (b'{"model": "mock"}', 400, "messages", "missing_required_parameter"),
        (b'{"model": "mock", "messages": [], "stream": "yes"}', 400, "stream", "invalid_type"),
        (b'{"model": "nope", "messages": []}', 404, "model", "model_not_found"),
        (b'{"model": "ghost", "messages": []}', 503, "model", "no_backend_available"),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: AsyncTestClient, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    response = await client.post("/v1/chat/completions", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def test_body_over_the_limit_is_413() -> None:
    app = create_app(settings(server=ServerSettings(max_body_size=2048)))
    async with AsyncTestClient(app=app) as client:
        response = await client.post("/v1/chat/completions", content=b'{"model":"mock","x":"' + b"a" * 4096 + b'"}')
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_unreachable_upstream_is_502(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{UP}/chat/completions")
    response = await client.post("/v1/chat/completions", json=chat("up-model"))
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unavailable"


async def test_upstream_timeout_is_504(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=f"{UP}/chat/completions")
    response = await client.post("/v1/chat/completions", json=chat("up-model", stream=True))
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"


async def test_upstream_error_status_passed_through(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    error = {
        "error": {
            "message": "context too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    httpx_mock.add_response(url=f"{UP}/chat/completions", status_code=400, json=error)
    response = await client.post("/v1/chat/completions", json=chat("up-model"))
    assert response.status_code == 400 and response.json() == error
    assert "x-request-id" in response.headers


async def test_other_endpoints_relayed_to_the_same_path(client: AsyncTestClient, httpx_mock: HTTPXMock) -> None:
    for path in ("completions", "embeddings", "responses"):
        httpx_mock.add_response(url=f"{UP}/{path}", json={"path": path})
        response = await client.post(f"/v1/{path}", json={"model": "fast", "input": "x", "top_k": 3})
        assert response.status_code == 200 and response.json() == {"path": path}
        sent = json.loads(httpx_mock.get_requests()[-1].content)
        assert sent == {"model": "org/served", "input": "x", "top_k": 3}


async def test_mock_embeddings_and_completions(client: AsyncTestClient) -> None:
    first = (await client.post("/v1/embeddings", json={"model": "mock", "input": ["a", "b", "a"]})).json()
    vectors = [d["embedding"] for d in first["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    text = (await client.post("/v1/completions", json={"model": "mock", "prompt": "say this", "max_tokens": 2})).json()
    assert text["choices"][0]["text"] == "say this"


async def test_models_list_and_retrieve(client: AsyncTestClient) -> None:
    listed = (await client.get("/v1/models")).json()
    assert listed["object"] == "list"
    owners = {m["id"]: m["owned_by"] for m in listed["data"]}
    assert owners == {"mock": "mock", "org/served": "up", "up-model": "up", "fast": "up"}
    assert all(m["object"] == "model" for m in listed["data"])
    card = (await client.get("/v1/models/org/served")).json()
    assert (card["id"], card["owned_by"]) == ("org/served", "up")
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_unknown_route_and_method_are_openai_errors(client: AsyncTestClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = await client.put("/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


async def test_health_and_ready(client: AsyncTestClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["components"]["backends"]["up"]["state"] == "up"


async def test_discovery_lists_models_and_ready_follows(httpx_mock: HTTPXMock) -> None:
    config = Settings(backends=[BackendSettings(name="v", kind="vllm", base_url=UP)])
    httpx_mock.add_response(url=f"{UP}/models", json={"object": "list", "data": [{"id": "qwen"}]})
    async with httpx.AsyncClient() as http, AsyncTestClient(app=create_app(config, http=http)) as client:
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["qwen"]
        assert (await client.get("/ready")).status_code == 200


async def test_failed_discovery_makes_the_replica_unready(httpx_mock: HTTPXMock) -> None:
    config = Settings(backends=[BackendSettings(name="v", kind="vllm", base_url=UP)])
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=f"{UP}/models")
    async with httpx.AsyncClient() as http, AsyncTestClient(app=create_app(config, http=http)) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 503
        backend = ready.json()["components"]["backends"]["v"]
        assert backend["state"] == "down" and "refused" in backend["reason"]


async def test_redis_outage_is_degraded_not_unready() -> None:
    dead = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    async with AsyncTestClient(app=create_app(settings(), redis=dead)) as client:
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["components"]["redis"]["state"] == "degraded"
    await dead.aclose()


async def test_cors_when_configured() -> None:
    app = create_app(settings(server=ServerSettings(cors_origins=["https://app.example"])))
    async with AsyncTestClient(app=app) as client:
        response = await client.options(
            "/v1/chat/completions", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
        )
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        answered = await client.post("/v1/chat/completions", json=chat(), headers={"origin": "https://app.example"})
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == "https://app.example"


async def test_the_hot_routes_answer_other_methods_as_a_route_handler_would(client: AsyncTestClient) -> None:
    # The chat, completions, embeddings and responses routes are ASGI routes (gateway/api.py): what
    # Litestar's route handlers do for free, they do themselves.
    refused = await client.put("/v1/chat/completions", json=chat())
    assert refused.status_code == 405
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert refused.headers["allow"] == "GET, OPTIONS, POST"
    assert "x-request-id" in refused.headers
    assert (await client.get("/v1/embeddings")).headers["allow"] == "OPTIONS, POST"
    options = await client.options("/v1/responses")
    assert options.status_code == 204 and options.headers["allow"] == "OPTIONS, POST"
    listing = await client.get("/v1/chat/completions")
    assert listing.status_code == 200 and listing.json()["object"] == "list"


async def test_the_hot_paths_skip_litestars_router_and_only_they_do() -> None:
    routed: list[str] = []

    async def router(scope: dict[str, Any], receive: Any, send: Any) -> None:
        routed.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    dispatch = Dispatch(router, "/v1")  # type: ignore[arg-type]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        scope = {"type": "http", "method": "OPTIONS", "path": path, "headers": [], "state": {}}
        await dispatch(scope, None, send)  # type: ignore[arg-type]
        assert sent[-2]["status"] == 204 and scope["path_template"] == path
    others = ["/v1/chat/completions/", "/v1/models", "/chat/completions", "/v1/chat/completions/x"]
    for path in others:
        await dispatch({"type": "http", "method": "POST", "path": path, "headers": []}, None, send)  # type: ignore[arg-type]
    await dispatch({"type": "websocket", "path": "/v1/chat/completions"}, None, send)  # type: ignore[arg-type]
    assert routed == [*others, "/v1/chat/completions"]


async def test_a_hot_route_answers_alike_past_litestar_and_through_it(client: AsyncTestClient) -> None:
    # The exact path goes straight to the route; with a trailing slash Litestar routes it there.
    for path in ("/v1/chat/completions", "/v1/chat/completions/"):
        ok = await client.post(path, json=chat())
        assert ok.status_code == 200 and ok.json()["object"] == "chat.completion", path
        bad = await client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", path
        assert bad.headers["x-request-id"]
        unknown = await client.post(path, json=chat(model="nowhere-model"))
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found", path
        refused = await client.delete(path)
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, OPTIONS, POST", path


async def test_every_api_route_refuses_a_request_without_a_key() -> None:
    # Authentication is attached to the /v1 and /chat routers, not to each route: a route added there
    # later is covered without anyone remembering to.
    keyed = settings(keys=[KeySettings(name="team", key="sk-team-0123456789abcdef")])
    app = create_app(keyed)
    checked = []
    async with AsyncTestClient(app=app) as client:
        for route in app.routes:
            if not (route.path.startswith("/v1") or route.path == "/chat"):
                continue
            if isinstance(route, ASGIRoute):
                methods = {"POST", "GET"} if route.path == "/v1/chat/completions" else {"POST"}
            elif isinstance(route, HTTPRoute):
                methods = route.methods - {"OPTIONS", "HEAD"}
            else:
                continue  # the WebSocket's guard is tested in tests/test_websocket.py
            for method in sorted(methods):
                path = route.path.replace(":path}", "}").replace(":str}", "}").replace("{", "").replace("}", "")
                response = await client.request(method, path, json={})
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "missing_api_key"
                checked.append((method, route.path))
    assert ("POST", "/v1/chat/completions") in checked and ("GET", "/v1/chat/completions") in checked
    assert ("POST", "/v1/embeddings") in checked and ("POST", "/chat") in checked
    assert len(checked) > 15


async def test_the_hot_routes_read_their_body_in_parts_and_notice_a_client_that_left() -> None:
    def receiving(*messages: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        return receive

    scope: dict[str, Any] = {"headers": []}
    parts = receiving(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert await read_body(scope, parts, 4) == b"abcd"
    with pytest.raises(PayloadTooLarge):
        await read_body(scope, receiving({"type": "http.request", "body": b"abcde"}), 4)
    with pytest.raises(PayloadTooLarge):  # refused by its declared length, before anything is read
        await read_body({"headers": [(b"content-length", b"5")]}, receiving(), 4)
    gone = receiving({"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"})
    with pytest.raises(ClientGone) as info:
        await read_body(scope, gone, 4)
    # Answered (to nobody) as a 499 the access line reports, not logged as a server error.
    rendered = render(info.value, "rid")
    assert rendered.status_code == 499


def test_app_state_reads_follow_every_write() -> None:
    state = AppState({"settings": 1, "copy": "a key named like a method"})
    state.backends = 2
    state["history"] = 3
    state.update(limiter=4)
    state.setdefault("usage", 5)
    assert (state.settings, state.backends, state.history, state.limiter, state.usage) == (1, 2, 3, 4, 5)
    state.settings, state["backends"], state.history = 6, 7, 8  # each overwritten another way
    state.update(usage=9)
    assert (state.settings, state.backends, state.history, state.usage) == (6, 7, 8, 9)
    del state.history
    del state["limiter"]
    state.pop("usage")
    for gone in ("history", "limiter", "usage"):
        assert gone not in state
        with pytest.raises(AttributeError):
            getattr(state, gone)
    assert state["copy"] == "a key named like a method" and state.copy()["settings"] == 6
    assert isinstance(create_app(Settings()).state, AppState)
