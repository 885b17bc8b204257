"""API keys, model access and rate limits end to end: two gateway processes sharing one redis-server,
the fake upstream, the openai SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory, RedisServer, Upstream
from tests.conftest import replicas as start_replicas

MASTER = "sk-master-test-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]
WINDOW = 3  # seconds: long enough for a test to run into a limit, short enough to wait out


def config(upstream: Upstream, redis_url: str, extra: str = "") -> str:
    return f"""
[redis]
url = "{redis_url}"

[auth]
master_key = "{MASTER}"

[limits]
window = {WINDOW}

{upstream.backend_toml(models=("fake-model", "other-model"))}
[[backends]]
name = "mock"
kind = "mock"

[[keys]]
name = "team-a"
key = "sk-team-a-0123456789"
tenant = "a"
models = ["fake-*"]

[[keys]]
name = "team-b"
key_sha256 = "{__import__("hashlib").sha256(b"sk-team-b-0123456789").hexdigest()}"
tenant = "b"
{extra}
"""


@pytest.fixture(scope="module")
def replicas(
    upstream_server: Upstream, redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    with start_replicas(config(upstream_server, redis_module.url), tmp_path_factory.mktemp("gateways")) as pair:
        yield pair


@pytest.fixture
def gateway(replicas: tuple[Gateway, Gateway], upstream_server: Upstream) -> Gateway:
    upstream_server.clear()
    return replicas[0]


def admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{gateway.url}/admin{path}", headers={"authorization": f"Bearer {MASTER}"}, timeout=10, **kwargs
    )


def new_key(gateway: Gateway, **fields: Any) -> dict[str, Any]:
    response = admin(gateway, "POST", "/keys", json={"name": f"k-{time.monotonic_ns()}", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_missing_and_unknown_keys_are_401(gateway: Gateway) -> None:
    missing = httpx.post(
        f"{gateway.base_url}/chat/completions", json={"model": "fake-model", "messages": MESSAGES}, timeout=5
    )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client(api_key="sk-wrong").chat.completions.create(model="fake-model", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"
    for header in ("api-key", "x-api-key"):
        response = httpx.get(f"{gateway.base_url}/models", headers={header: "sk-team-a-0123456789"}, timeout=5)
        assert response.status_code == 200


def test_open_routes_need_no_key(gateway: Gateway) -> None:
    for path in ("/health", "/ready", "/"):
        assert httpx.get(f"{gateway.url}{path}", timeout=5).status_code == 200


def test_model_access(gateway: Gateway) -> None:
    team_a = gateway.client(api_key="sk-team-a-0123456789")
    assert [m.id for m in team_a.models.list()] == ["fake-model"]
    assert team_a.chat.completions.create(model="fake-model", messages=MESSAGES).choices
    with pytest.raises(openai.NotFoundError) as info:  # served, but not for this key
        team_a.chat.completions.create(model="other-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    team_b = gateway.client(api_key="sk-team-b-0123456789")  # configured by hash only
    assert {m.id for m in team_b.models.list()} == {"fake-model", "other-model", "mock"}


def test_history_is_scoped_to_the_key_tenant(gateway: Gateway) -> None:
    team_a = gateway.client(api_key="sk-team-a-0123456789")
    team_b = gateway.client(api_key="sk-team-b-0123456789")
    mine = team_a.chat.completions.create(model="fake-model", messages=MESSAGES)
    deadline = time.monotonic() + 5
    while True:
        try:
            team_a.chat.completions.retrieve(mine.id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(openai.NotFoundError):
        team_b.chat.completions.retrieve(mine.id)
    assert mine.id not in [c.id for c in team_b.chat.completions.list()]
    conversation = team_a.conversations.create()
    with pytest.raises(openai.NotFoundError):
        team_b.conversations.retrieve(conversation.id)


async def test_fifty_concurrent_requests_against_ten_admit_exactly_ten(replicas: tuple[Gateway, Gateway]) -> None:
    key = new_key(replicas[0], rpm=10)["key"]
    clients = [gateway.async_client(api_key=key, timeout=20) for gateway in replicas]

    async def one(i: int) -> bool:
        try:
            await clients[i % 2].chat.completions.create(model="fake-model", messages=MESSAGES)
        except openai.RateLimitError:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(50)))
    for client in clients:
        await client.close()
    assert sum(results) == 10  # one global limit, across both replicas


def test_rate_limit_headers_count_down_and_reset(gateway: Gateway) -> None:
    key = new_key(gateway, rpm=3, tpm=100_000)["key"]
    client = gateway.client(api_key=key)
    seen = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES, max_tokens=5)
        seen.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert seen == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert info.value.code == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1
    time.sleep(WINDOW + 0.2)
    raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"


def test_sdk_backoff_waits_out_the_limit(gateway: Gateway) -> None:
    key = new_key(gateway, rpm=1)["key"]
    gateway.client(api_key=key).chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        gateway.client(api_key=key, max_retries=0).chat.completions.create(model="fake-model", messages=MESSAGES)
    started = time.monotonic()
    reply = gateway.client(api_key=key, max_retries=3).chat.completions.create(model="fake-model", messages=MESSAGES)
    assert reply.choices and time.monotonic() - started >= 1  # it honoured Retry-After


def test_tpm_reservation_then_admitted_after_reset(gateway: Gateway) -> None:
    key = new_key(gateway, tpm=300)["key"]
    client = gateway.client(api_key=key)
    client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=200)
    with pytest.raises(openai.RateLimitError) as info:  # its reservation (prompt + 200) no longer fits
        client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=200)
    wait = int(info.value.response.headers["retry-after-ms"]) / 1000
    assert wait <= WINDOW
    time.sleep(wait + 0.1)
    assert client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=200).choices
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=400)
    assert "too large" in info.value.message


def test_streamed_tokens_charged_without_showing_the_usage_chunk(gateway: Gateway, upstream_server: Upstream) -> None:
    key = new_key(gateway, tpm=1000)
    client = gateway.client(api_key=key["key"])
    chunks = list(client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True, max_tokens=7))
    assert all(c.usage is None for c in chunks), "the client did not ask for usage"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " ".join(
        f"tok{i}" for i in range(7)
    )
    (request,) = upstream_server.requests("/v1/chat/completions")
    assert request["body"]["stream_options"] == {"include_usage": True}
    # The usage the upstream reported (10 prompt + 7 completion) is what the key was charged.
    rows = []
    deadline = time.monotonic() + 5
    while not rows and time.monotonic() < deadline:
        rows = admin(gateway, "GET", "/usage", params={"key_id": key["id"]}).json()["data"]
        time.sleep(0.05)
    assert rows == [
        {
            "key_id": key["id"],
            "key_name": key["name"],
            "model": "fake-model",
            "day": rows[0]["day"],
            "requests": 1,
            "prompt_tokens": 10,
            "completion_tokens": 7,
        }
    ]
    # A client that asks for usage still gets it.
    asked = list(
        client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True, max_tokens=2, stream_options={"include_usage": True}
        )
    )
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 2


def test_max_parallel_rejects_at_once(gateway: Gateway) -> None:
    key = new_key(gateway, max_parallel=1)["key"]
    slow = {"model": "fake-model", "messages": MESSAGES, "stream": True, "max_tokens": 10, "fake_token_delay": 0.1}
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        json=slow,
        timeout=10,
        headers={"authorization": f"Bearer {key}"},
    ) as first:
        assert first.status_code == 200
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError):
            gateway.client(api_key=key).chat.completions.create(model="fake-model", messages=MESSAGES)
        assert time.monotonic() - started < 1  # refused, not queued
        first.read()
    assert gateway.client(api_key=key).chat.completions.create(model="fake-model", messages=MESSAGES).choices


def test_admin_keys_lifecycle_and_revocation_on_both_replicas(replicas: tuple[Gateway, Gateway]) -> None:
    first, second = replicas
    created = new_key(first, tenant="c", models=["fake-model"], rpm=100)
    assert created["key"].startswith("sk-gw-") and created["tenant"] == "c"
    listed = admin(first, "GET", "/keys").json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("key" not in k and "key_sha256" not in k for k in listed)
    assert admin(second, "GET", f"/keys/{created['id']}").json()["rpm"] == 100
    patched = admin(second, "PATCH", f"/keys/{created['id']}", json={"rpm": 5}).json()
    assert patched["rpm"] == 5
    for gateway in replicas:
        assert gateway.client(api_key=created["key"]).chat.completions.create(model="fake-model", messages=MESSAGES)
    assert admin(first, "DELETE", f"/keys/{created['id']}").json()["deleted"]
    time.sleep(1.1)  # revocation reaches every replica within a second
    for gateway in replicas:
        with pytest.raises(openai.AuthenticationError):
            gateway.client(api_key=created["key"]).chat.completions.create(model="fake-model", messages=MESSAGES)


def test_expired_key_fails_on_both_replicas(replicas: tuple[Gateway, Gateway]) -> None:
    expires_at = int(time.time()) + 2  # whole seconds: at least one second from now
    key = new_key(replicas[0], expires_at=expires_at)["key"]
    assert replicas[1].client(api_key=key).models.list()
    time.sleep(max(0.0, expires_at - time.time()) + 0.3)
    for gateway in replicas:
        with pytest.raises(openai.AuthenticationError) as info:
            gateway.client(api_key=key).models.list()
        assert info.value.code == "expired_api_key"


def test_admin_needs_the_master_key(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/admin/keys", timeout=5).status_code == 401
    response = httpx.get(
        f"{gateway.url}/admin/keys", headers={"authorization": "Bearer sk-team-a-0123456789"}, timeout=5
    )
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    bad = admin(gateway, "POST", "/keys", json={"name": "x", "rmp": 5})
    assert bad.status_code == 400  # a misspelt limit must not create an unlimited key


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_redis_outage(
    mode: str, upstream_server: Upstream, redis_server: RedisServer, start_gateway: GatewayFactory
) -> None:
    text = config(upstream_server, redis_server.url).replace(
        f"window = {WINDOW}", f'window = {WINDOW}\non_redis_error = "{mode}"'
    )
    gateway = start_gateway(text)
    key = new_key(gateway, rpm=2)["key"]
    client = gateway.client(api_key=key)
    assert client.chat.completions.create(model="fake-model", messages=MESSAGES)  # authenticated and cached
    redis_server.stop()
    if mode == "fail_open":
        # Admitted on this process's own limiter: still limited, and /ready says so.
        assert client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert client.chat.completions.create(model="fake-model", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="fake-model", messages=MESSAGES)
        ready = httpx.get(f"{gateway.url}/ready", timeout=5)
        assert ready.status_code == 200 and ready.json()["components"]["limits"]["state"] == "degraded"
    else:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert info.value.status_code == 503 and info.value.code == "rate_limits_unavailable"
    # Static keys never need Redis to authenticate.
    assert gateway.client(api_key="sk-team-b-0123456789").models.list()
    redis_server.start()
