"""Resumable streams end to end: two gateway processes sharing a redis-server, the fake upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory, RedisServer, Upstream
from tests.conftest import replicas as start_replicas

MESSAGES = [{"role": "user", "content": "hi"}]
FULL = " ".join(f"tok{i}" for i in range(20))


def config(upstream: Upstream, redis_url: str | None) -> str:
    redis = f'[redis]\nurl = "{redis_url}"\n' if redis_url else ""
    return f"""
{redis}
{upstream.backend_toml()}"""


@pytest.fixture(scope="module")
def replicas(
    upstream_server: Upstream, redis_module: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    with start_replicas(config(upstream_server, redis_module.url), tmp_path_factory.mktemp("gateways")) as pair:
        yield pair


@pytest.fixture
def upstream(upstream_server: Upstream, replicas: tuple[Gateway, Gateway]) -> Upstream:
    upstream_server.clear()
    return upstream_server


def events(lines: Iterator[str], limit: int | None = None) -> list[tuple[str, str]]:
    """(id, data) of each SSE event, up to ``limit`` events."""
    out: list[tuple[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in current:
                out.append((current.get("id", ""), current["data"]))
                if limit is not None and len(out) >= limit:
                    break
            current = {}
        elif ":" in line and not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return out


def text_of(received: list[tuple[str, str]]) -> str:
    text = ""
    for _, data in received:
        if data != "[DONE]":
            chunk = json.loads(data)
            text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
    return text


def start_stream(gateway: Gateway, limit: int, **extra: Any) -> list[tuple[str, str]]:
    """Open a resumable stream, read ``limit`` events, drop the connection."""
    body = {
        "model": "fake-model",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 20,
        "fake_token_delay": 0.05,
        **extra,
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, timeout=10, headers={"x-resumable": "true"}
    ) as response:
        assert response.status_code == 200
        return events(response.iter_lines(), limit)


def resume(
    gateway: Gateway, completion_id: str, *, last_event_id: str | None = None, starting_after: int | None = None
) -> list[tuple[str, str]]:
    headers = {"last-event-id": last_event_id} if last_event_id else {}
    params = {"starting_after": starting_after} if starting_after is not None else {}
    with httpx.stream(
        "GET", f"{gateway.base_url}/chat/completions/{completion_id}/stream", headers=headers, params=params, timeout=10
    ) as response:
        assert response.status_code == 200, response.read()
        return events(response.iter_lines())


def test_every_event_is_numbered(replicas: tuple[Gateway, Gateway], upstream: Upstream) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    with httpx.stream("POST", f"{replicas[0].base_url}/chat/completions", json=body, timeout=10) as response:
        received = events(response.iter_lines())
    completion_id = json.loads(received[0][1])["id"]
    assert [event_id for event_id, _ in received] == [f"{completion_id}/{i}" for i in range(len(received))]
    assert received[-1][1] == "[DONE]"


@pytest.mark.parametrize("how", ["last_event_id", "starting_after"])
def test_resumed_on_another_replica_gets_exactly_the_missing_events(
    replicas: tuple[Gateway, Gateway], upstream: Upstream, how: str
) -> None:
    first, second = replicas
    seen = start_stream(first, 5)
    last_id = seen[-1][0]
    completion_id, last_seq = last_id.rsplit("/", 1)
    if how == "last_event_id":
        rest = resume(second, completion_id, last_event_id=last_id)
    else:
        rest = resume(second, completion_id, starting_after=int(last_seq))
    ids = [event_id for event_id, _ in seen + rest]
    assert ids == [f"{completion_id}/{i}" for i in range(len(ids))]  # nothing missing, nothing twice
    assert rest[-1][1] == "[DONE]"
    assert text_of(seen + rest) == FULL  # the same as an uninterrupted run
    # From the start, the whole stream again.
    assert resume(second, completion_id) == seen + rest


def test_generation_continues_and_is_recorded_after_the_client_left(
    replicas: tuple[Gateway, Gateway], upstream: Upstream
) -> None:
    seen = start_stream(replicas[0], 2)
    completion_id = seen[0][0].rsplit("/", 1)[0]
    client = replicas[1].client()
    deadline = time.monotonic() + 10
    while True:
        try:
            stored = client.chat.completions.retrieve(completion_id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "the generation was not recorded"
            time.sleep(0.1)
    assert stored.choices[0].message.content == FULL and stored.choices[0].finish_reason == "length"
    assert not [e for e in upstream.events() if e["type"] == "disconnect"]


def test_cancel_from_another_replica(replicas: tuple[Gateway, Gateway], upstream: Upstream) -> None:
    first, second = replicas
    body = {
        "model": "fake-model",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 200,
        "fake_token_delay": 0.05,
        "background": True,
    }
    with httpx.stream("POST", f"{first.base_url}/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        head = events(lines, 3)
        completion_id = head[0][0].rsplit("/", 1)[0]
        cancelled = httpx.post(f"{second.base_url}/chat/completions/{completion_id}/cancel", timeout=5)
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"]
        started = time.monotonic()
        tail = events(lines)
    assert time.monotonic() - started < 3  # long before the 10 s the reply would take
    assert tail[-1][1] == "[DONE]"
    assert json.loads(tail[-2][1])["choices"][0]["finish_reason"] == "cancelled"
    upstream.wait_event("disconnect")
    assert "background" not in upstream.requests("/v1/chat/completions")[0]["body"]
    client = second.client()
    deadline = time.monotonic() + 5
    while True:
        try:
            stored = client.chat.completions.retrieve(completion_id)
            break
        except openai.NotFoundError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert stored.choices[0].finish_reason == "cancelled"


def test_unknown_stream_is_404(replicas: tuple[Gateway, Gateway]) -> None:
    assert httpx.get(f"{replicas[0].base_url}/chat/completions/chatcmpl-nope/stream", timeout=5).status_code == 404
    assert httpx.post(f"{replicas[0].base_url}/chat/completions/chatcmpl-nope/cancel", timeout=5).status_code == 404


def test_resumable_without_redis(upstream: Upstream, start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(config(upstream, None))
    seen = start_stream(gateway, 4)
    completion_id, last_seq = seen[-1][0].rsplit("/", 1)
    rest = resume(gateway, completion_id, starting_after=int(last_seq))
    assert text_of(seen + rest) == FULL
