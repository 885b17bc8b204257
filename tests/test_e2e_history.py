"""History end to end: a real redis-server, the gateway process, the fake upstream, the openai SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import redis

from tests.conftest import Gateway, RedisServer, Upstream

T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout: float = 5.0) -> T:
    """History is written after the reply is sent: poll until ``probe`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if value:
                return value
        except openai.NotFoundError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {probe}")
        time.sleep(0.05)


def config(upstream: Upstream, redis_url: str, extra: str = "") -> str:
    return f"""
[redis]
url = "{redis_url}"

[history]
ttl_days = 2
max_messages = 50

{upstream.backend_toml()}{extra}
"""


@pytest.fixture(scope="module")
def gateway(
    upstream_server: Upstream, redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gateway")
    path = directory / "gateway.toml"
    path.write_text(config(upstream_server, redis_module.url))
    process = Gateway(path, directory).start()
    yield process
    process.stop()


@pytest.fixture
def upstream(upstream_server: Upstream, gateway: Gateway) -> Upstream:
    upstream_server.clear()
    return upstream_server


def user_client(gateway: Gateway, user: str | None) -> openai.OpenAI:
    return gateway.client(timeout=10, default_headers={"x-user-id": user} if user else None)


def ask(client: openai.OpenAI, text: str, **kwargs: Any) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}], **kwargs)


def test_completions_recorded_listed_retrieved_deleted(gateway: Gateway, upstream: Upstream) -> None:
    client = user_client(gateway, "alice-crud")
    completion = ask(client, "hello", max_tokens=2, metadata={"topic": "greeting"})
    stored = eventually(lambda: client.chat.completions.retrieve(completion.id))
    assert stored.choices[0].message.content == "tok0 tok1"
    assert stored.metadata == {"topic": "greeting", "user": "alice-crud"}
    messages = client.chat.completions.messages.list(completion.id)
    assert [(m.role, m.content) for m in messages] == [("user", "hello")]
    updated = client.chat.completions.update(completion.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}
    assert completion.id in [c.id for c in client.chat.completions.list()]
    deleted = client.chat.completions.delete(completion.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(completion.id)


def test_streamed_reply_recorded_equal_to_streamed_text(gateway: Gateway, upstream: Upstream) -> None:
    client = user_client(gateway, "alice-stream")
    chunks = list(ask(client, "stream please", stream=True, max_tokens=6, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    stored = eventually(lambda: client.chat.completions.retrieve(chunks[0].id))
    assert stored.choices[0].message.content == streamed == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert stored.choices[0].finish_reason == "length"
    assert stored.usage is not None and stored.usage.completion_tokens == 6


def test_failed_stream_recorded_with_what_was_produced(gateway: Gateway, upstream: Upstream) -> None:
    client = user_client(gateway, "alice-partial")
    stream = ask(client, "fail half-way", stream=True, max_tokens=5, extra_body={"fake_scenario": "drop_mid_stream"})
    chunks = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            chunks.append(chunk)
    stored = eventually(lambda: client.chat.completions.retrieve(chunks[0].id))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stored.choices[0].message.content == streamed == "tok0"
    assert stored.choices[0].finish_reason == "error"


def test_abandoned_stream_recorded_as_cancelled(gateway: Gateway, upstream: Upstream) -> None:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "max_tokens": 40,
        "fake_token_delay": 0.05,
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, timeout=10, headers={"x-user-id": "alice-gone"}
    ) as response:
        lines = [line for line, _ in zip(response.iter_lines(), range(6), strict=False) if line.startswith("data: ")]
    completion_id = json.loads(lines[0][6:])["id"]
    client = user_client(gateway, "alice-gone")
    stored = eventually(lambda: client.chat.completions.retrieve(completion_id))
    assert stored.choices[0].finish_reason == "cancelled"
    assert stored.choices[0].message.content and stored.choices[0].message.content.startswith("tok0")


def test_metadata_filter_and_pagination(gateway: Gateway, upstream: Upstream) -> None:
    client = user_client(gateway, "bob-pages")
    ids = [ask(client, f"q{i}", metadata={"batch": "b1" if i % 2 else "b2"}).id for i in range(7)]
    odd = [ids[i] for i in range(7) if i % 2]
    eventually(lambda: len(list(client.chat.completions.list(metadata={"batch": "b1"}))) == 3)
    first = client.chat.completions.list(metadata={"batch": "b1"}, limit=2)
    assert [c.id for c in first.data] == odd[:2] and first.has_more
    rest = client.chat.completions.list(metadata={"batch": "b1"}, limit=2, after=first.data[-1].id)
    assert [c.id for c in rest.data] == odd[2:] and not rest.has_more
    newest_first = client.chat.completions.list(order="desc", limit=3)
    assert [c.id for c in newest_first.data] == ids[::-1][:3]
    # The SDK's auto-pagination walks every page.
    assert [c.id for c in client.chat.completions.list(limit=2)] == ids
    assert [c.id for c in client.chat.completions.list(model="fake-model")] == ids


def test_user_isolation(gateway: Gateway, upstream: Upstream) -> None:
    carol, dave, tenant = user_client(gateway, "carol"), user_client(gateway, "dave"), user_client(gateway, None)
    mine = ask(carol, "carol's secret")
    theirs = ask(dave, "dave's")
    eventually(lambda: tenant.chat.completions.retrieve(theirs.id))
    eventually(lambda: tenant.chat.completions.retrieve(mine.id))
    with pytest.raises(openai.NotFoundError):
        dave.chat.completions.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        dave.chat.completions.delete(mine.id)
    assert mine.id not in [c.id for c in dave.chat.completions.list()]
    # A request naming no user reads the whole tenant, and can narrow with metadata[user].
    assert {mine.id, theirs.id} <= {c.id for c in tenant.chat.completions.list()}
    assert [c.id for c in tenant.chat.completions.list(metadata={"user": "carol"})] == [mine.id]
    # The body's `user` field names the user too.
    by_body = ask(tenant, "via body", user="erin")
    eventually(lambda: tenant.chat.completions.retrieve(by_body.id))
    with pytest.raises(openai.NotFoundError):
        carol.chat.completions.retrieve(by_body.id)


def test_conversation_round_trip_sends_only_the_new_turn(gateway: Gateway, upstream: Upstream) -> None:
    client = user_client(gateway, "frank")
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "system", "content": "You are terse."}], metadata={"project": "x"}
    )
    assert client.conversations.retrieve(conversation.id).metadata == {"project": "x"}
    first = ask(client, "first question", max_tokens=2, extra_body={"conversation": conversation.id})
    eventually(lambda: len(list(client.conversations.items.list(conversation.id))) == 3)
    upstream.clear()
    ask(client, "second question", max_tokens=3, extra_body={"conversation": conversation.id})
    (request,) = upstream.requests("/v1/chat/completions")
    assert "conversation" not in request["body"]
    assert request["body"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "second question"},
    ]
    items = eventually(
        lambda: (lambda page: page if len(page) == 5 else None)(
            list(client.conversations.items.list(conversation.id, order="asc"))
        )
    )
    assert [(i.type, i.role) for i in items] == [
        ("message", "system"),
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
        ("message", "assistant"),
    ]
    assert items[-1].content[0].text == "tok0 tok1 tok2"
    # Items API: retrieve one, delete one, add one.
    assert client.conversations.items.retrieve(items[1].id, conversation_id=conversation.id).id == items[1].id
    client.conversations.items.delete(items[1].id, conversation_id=conversation.id)
    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "note"}]
    )
    assert added.data[0].content[0].text == "note"
    assert len(list(client.conversations.items.list(conversation.id))) == 5
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        ask(client, "after delete", extra_body={"conversation": conversation.id})


async def test_concurrent_turns_on_one_conversation_keep_every_item_in_pairs(
    gateway: Gateway, upstream: Upstream
) -> None:
    client = gateway.async_client(timeout=20)
    conversation = await client.conversations.create()

    async def turn(i: int) -> None:
        await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": f"u{i}"}],
            max_tokens=1 + i % 3,
            stream=i % 2 == 0,
            extra_body={"conversation": conversation.id},
        )

    await asyncio.gather(*(turn(i) for i in range(10)))

    async def all_items() -> list[Any]:
        for _ in range(100):
            page = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
            if len(page) == 20:
                return page
            await asyncio.sleep(0.05)
        raise AssertionError(f"only {len(page)} items")

    items = await all_items()
    await client.close()
    for user_item, reply_item in zip(items[::2], items[1::2], strict=True):
        assert user_item.role == "user" and reply_item.role == "assistant"
        i = int(user_item.content[0].text[1:])
        assert reply_item.content[0].text == " ".join(f"tok{n}" for n in range(1 + i % 3))


def test_conversation_of_another_user_is_404(gateway: Gateway, upstream: Upstream) -> None:
    grace, heidi = user_client(gateway, "grace"), user_client(gateway, "heidi")
    conversation = grace.conversations.create()
    with pytest.raises(openai.NotFoundError):
        heidi.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        ask(heidi, "peek", extra_body={"conversation": conversation.id})
    listed = httpx.get(f"{gateway.base_url}/conversations", params={"user": "grace"}, timeout=5).json()
    assert conversation.id in [c["id"] for c in listed["data"]]
    assert conversation.id not in [
        c["id"]
        for c in httpx.get(f"{gateway.base_url}/conversations", params={"user": "heidi"}, timeout=5).json()["data"]
    ]


def test_legacy_chat_route_keeps_a_default_conversation(gateway: Gateway, upstream: Upstream) -> None:
    def chat(message: str) -> str:
        text = ""
        with httpx.stream(
            "POST", f"{gateway.url}/chat", json={"user_id": "ivan", "message": message}, timeout=10
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = openai.types.chat.ChatCompletionChunk.model_validate_json(line[6:])
                    text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        return text

    assert chat("hello") == "tok0 tok1 tok2 tok3 tok4"
    listed = httpx.get(f"{gateway.base_url}/conversations", params={"user": "ivan"}, timeout=5).json()["data"]
    assert len(listed) == 1
    eventually(
        lambda: (
            len(httpx.get(f"{gateway.base_url}/conversations/{listed[0]['id']}/items", timeout=5).json()["data"]) == 2
        )
    )
    upstream.clear()
    chat("again")
    assert [m["content"] for m in upstream.requests("/v1/chat/completions")[0]["body"]["messages"]] == [
        "hello",
        "tok0 tok1 tok2 tok3 tok4",
        "again",
    ]


def test_ttl_applied(gateway: Gateway, upstream: Upstream, redis_module: RedisServer) -> None:
    client = user_client(gateway, "judy")
    completion = ask(client, "expire me")
    eventually(lambda: client.chat.completions.retrieve(completion.id))
    r = redis.Redis.from_url(redis_module.url)
    keys = [k for k in r.scan_iter(match="*") if completion.id.encode() in k]
    assert keys
    for key in keys:
        assert 0 < r.ttl(key) <= 2 * 86_400


def test_redis_outage(upstream_server: Upstream, redis_server: RedisServer, start_gateway: Any) -> None:
    gateway = start_gateway(config(upstream_server, redis_server.url))
    client = user_client(gateway, "kate")
    conversation = client.conversations.create()
    redis_server.stop()
    # A chat without a conversation still streams; its record waits in the queue.
    chunks = list(ask(client, "while redis is down", stream=True, max_tokens=2))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1"
    plain = ask(client, "also down")
    # A chat that needs its conversation fails fast and says why.
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "needs history", extra_body={"conversation": conversation.id})
    assert info.value.status_code == 503 and info.value.code == "history_unavailable"
    assert time.monotonic() - started < 5
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 200
    body = ready.json()["components"]
    assert body["redis"]["state"] == "degraded" and body["history"]["queued"] >= 2
    redis_server.start()
    # The redis-server is new and empty: what it holds now was written from the queue.
    eventually(lambda: client.chat.completions.retrieve(plain.id), timeout=10)
    eventually(lambda: client.chat.completions.retrieve(chunks[0].id), timeout=10)
    assert httpx.get(f"{gateway.url}/ready", timeout=5).json()["components"]["redis"]["state"] == "up"


def test_require_redis_takes_the_replica_out(
    upstream_server: Upstream, redis_server: RedisServer, start_gateway: Any
) -> None:
    gateway = start_gateway(config(upstream_server, redis_server.url, "[health]\nrequire_redis = true\n"))
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200
    redis_server.stop()
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503
    redis_server.start()
    assert eventually(lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200)


def test_memory_store_by_default(upstream_server: Upstream, start_gateway: Any, tmp_path: Path) -> None:
    gateway = start_gateway(f"""
[[backends]]
name = "fake"
kind = "vllm"
base_url = "{upstream_server.base_url}"
models = ["fake-model"]
""")
    client = user_client(gateway, "leo")
    completion = ask(client, "kept in memory")
    assert eventually(lambda: client.chat.completions.retrieve(completion.id)).id == completion.id
    assert httpx.get(f"{gateway.url}/ready", timeout=5).json()["components"]["history"]["store"] == "memory"
