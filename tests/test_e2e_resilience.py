"""Resilience end to end: real upstream processes that the tests start, kill and slow down, the gateway
as a process, the openai SDK."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstream, UpstreamFactory, free_port

MESSAGES = [{"role": "user", "content": "hi"}]


def two_backends(a: Upstream, b: Upstream, extra: str = "") -> str:
    return f"""
[health]
failure_threshold = 3
cooldown = 1.0
interval = 0.5

[retries]
max_attempts = 3
backoff = 0.01

[[backends]]
name = "a"
kind = "vllm"
base_url = "{a.base_url}"
models = ["fake-model"]

[[backends]]
name = "b"
kind = "vllm"
base_url = "{b.base_url}"
models = ["fake-model"]
{extra}
"""


def served_by(upstream: Upstream) -> int:
    return len(upstream.requests("/v1/chat/completions"))


async def test_two_replicas_share_the_load(start_upstream: UpstreamFactory, start_gateway: GatewayFactory) -> None:
    a, b = start_upstream(name="a"), start_upstream(name="b")
    gateway = start_gateway(two_backends(a, b))
    client = gateway.async_client(timeout=20)
    await asyncio.gather(
        *(
            client.chat.completions.create(model="fake-model", messages=MESSAGES, extra_body={"fake_delay": 0.05})
            for _ in range(40)
        )
    )
    for _ in range(20):  # one after another, too
        await client.chat.completions.create(model="fake-model", messages=MESSAGES)
    await client.close()
    assert served_by(a) + served_by(b) == 60
    assert min(served_by(a), served_by(b)) >= 12, (served_by(a), served_by(b))


async def test_killed_replica(start_upstream: UpstreamFactory, start_gateway: GatewayFactory) -> None:
    """Streams flowing from the killed replica end with an error event; requests not yet started fail
    over, with no error for the client."""
    a, b = start_upstream(name="a"), start_upstream(name="b")
    gateway = start_gateway(two_backends(a, b))
    client = gateway.async_client(timeout=30)

    async def stream() -> str:
        text = ""
        try:
            response = await client.chat.completions.create(
                model="fake-model", messages=MESSAGES, stream=True, max_tokens=30, extra_body={"fake_token_delay": 0.05}
            )
            async for chunk in response:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        except openai.APIError:
            return "error"
        return text

    flowing = [asyncio.create_task(stream()) for _ in range(10)]
    await asyncio.sleep(0.5)
    assert served_by(a) and served_by(b), "both replicas should be streaming"
    a.stop(signal.SIGKILL)
    results = await asyncio.gather(*flowing)
    complete = " ".join(f"tok{i}" for i in range(30))
    assert set(results) <= {"error", complete}
    assert "error" in results and complete in results
    # New requests: every one answered, none of them an error, while "a" is dead.
    replies = await asyncio.gather(
        *(client.chat.completions.create(model="fake-model", messages=MESSAGES) for _ in range(20))
    )
    assert all(r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4" for r in replies)
    await client.close()
    async with httpx.AsyncClient() as plain:
        ready = (await plain.get(f"{gateway.url}/ready")).json()["components"]["backends"]
    assert ready["a"]["state"] in ("down", "ejected") and ready["b"]["state"] == "up"


def test_failing_backend_ejected_then_let_back(
    start_upstream: UpstreamFactory, start_gateway: GatewayFactory, tmp_path: Any
) -> None:
    upstream = start_upstream(name="flaky")
    gateway = start_gateway(f"""
[health]
failure_threshold = 3
cooldown = 1.0
interval = 60

[retries]
max_attempts = 1

{upstream.backend_toml("flaky")}""")
    client = gateway.client()
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="fake-model", messages=MESSAGES, extra_body={"fake_scenario": "error_500"}
            )
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["components"]["backends"]["flaky"]["state"] == "ejected"
    upstream.clear()
    with pytest.raises(openai.InternalServerError) as info:  # ejected: not even tried
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert info.value.status_code == 503 and info.value.code == "no_backend_available"
    assert not upstream.requests()
    time.sleep(1.1)
    assert client.chat.completions.create(model="fake-model", messages=MESSAGES).choices  # the trial
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["components"]["backends"]["flaky"]["state"] == "up"


def test_first_token_timeout_fails_over(start_upstream: UpstreamFactory, start_gateway: GatewayFactory) -> None:
    slow, fast = start_upstream(name="slow"), start_upstream(name="fast")
    gateway = start_gateway(f"""
[retries]
max_attempts = 2
backoff = 0.01

[[backends]]
name = "slow"
kind = "vllm"
base_url = "{slow.base_url}"
models = ["fake-model"]
timeouts = {{ first_token = 0.5 }}
weight = 1000

[[backends]]
name = "fast"
kind = "vllm"
base_url = "{fast.base_url}"
models = ["fake-model"]
""")
    client = gateway.client(timeout=10)
    # The slow one is tried first (weight); it stalls before its first token, so the fast one answers.
    slow_body = {"fake_scenario": "slow_first_token", "fake_delay": 3}
    chunks = list(
        client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True, extra_body=slow_body)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4"
    assert served_by(slow) == 1 and served_by(fast) == 1


def test_fallback_model(upstream: Upstream, start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(f"""
[retries]
backoff = 0.01

[[backends]]
name = "big"
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["big-model"]

{upstream.backend_toml("small")}
[[models]]
name = "big-model"
fallbacks = ["fake-model"]
""")
    reply = gateway.client().chat.completions.create(model="big-model", messages=MESSAGES, extra_body={"top_k": 2})
    assert reply.choices[0].message.content
    (request,) = upstream.requests("/v1/chat/completions")
    assert request["body"]["model"] == "fake-model" and request["body"]["top_k"] == 2


def test_repetition_guard(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway("""
[guard]
repeated_ngram = 2
repeats = 4

[[backends]]
name = "mock"
kind = "mock"
""")
    looping = "over and " * 20
    with pytest.raises(openai.APIError) as info:
        list(
            gateway.client().chat.completions.create(
                model="mock", messages=[{"role": "user", "content": looping}], stream=True
            )
        )
    assert info.value.code == "repetition_detected"
    fine = gateway.client().chat.completions.create(model="mock", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in fine if c.choices) == "hi"


async def test_sigterm_during_fifty_streams_loses_none(upstream: Upstream, start_gateway: GatewayFactory) -> None:
    gateway: Gateway = start_gateway(f"""
[shutdown]
drain_delay = 1.0
grace_period = 20

{upstream.backend_toml()}""")
    client = gateway.async_client(timeout=30)

    async def stream() -> str:
        response = await client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True, max_tokens=20, extra_body={"fake_token_delay": 0.1}
        )
        return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])

    streams = [asyncio.create_task(stream()) for _ in range(50)]
    await asyncio.sleep(0.5)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient() as plain:
        ready = await plain.get(f"{gateway.url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        # Still admitted during the drain delay: load balancers are only now taking it out.
        late = await plain.post(
            f"{gateway.base_url}/chat/completions", json={"model": "fake-model", "messages": MESSAGES}
        )
        assert late.status_code == 200
    results = await asyncio.gather(*streams)
    await client.close()
    assert results == [" ".join(f"tok{i}" for i in range(20))] * 50
    assert await asyncio.to_thread(gateway.process.wait, 15) == 0
