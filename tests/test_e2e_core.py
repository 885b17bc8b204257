"""The gateway as users run it: `gateway serve` in its own process, in front of a real upstream
process, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, Upstream, free_port


@pytest.fixture(scope="module")
def gateway(upstream_server: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("gateway")
    config = directory / "gateway.toml"
    # Tests here fail the upstream on purpose, one exchange at a time: no retries, no ejection.
    config.write_text(f"""
[timeouts]
first_token = 1.0
idle = 1.0

[retries]
max_attempts = 1

[health]
failure_threshold = 1000

[[backends]]
name = "fake"
kind = "vllm"
base_url = "{upstream_server.base_url}"

[[backends]]
name = "mock"
kind = "mock"

[[backends]]
name = "dead"
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["dead-model"]

[aliases]
fast = "fake-model"
ghost = "no-backend-serves-this"
""")
    process = Gateway(config, directory).start()
    yield process
    process.stop()


@pytest.fixture
def upstream(upstream_module: Upstream, gateway: Gateway) -> Upstream:
    upstream_module.clear()
    return upstream_module


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    return gateway.client(timeout=10)


MESSAGES = [{"role": "user", "content": "hi"}]


def test_models_list_discovered_and_aliases(client: openai.OpenAI) -> None:
    owners = {model.id: model.owned_by for model in client.models.list()}
    assert owners == {"fake-model": "fake", "mock": "mock", "dead-model": "dead", "fast": "fake"}
    assert "ghost" not in owners  # its target is served by nobody
    assert client.models.retrieve("fast").owned_by == "fake"


def test_non_stream(client: openai.OpenAI, upstream: Upstream) -> None:
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
    assert completion.choices[0].message.content == "tok0 tok1 tok2"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    (request,) = upstream.requests("/v1/chat/completions")
    assert request["path"] == "/v1/chat/completions" and request["headers"]["x-request-id"]


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_mock_backend_streams(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "echo me"}], stream=True, n=2
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "echo me", 1: "echo me"}


def test_unknown_fields_reach_upstream_byte_for_byte(gateway: Gateway, upstream: Upstream) -> None:
    body = (
        b'{"model":"fake-model","messages":[{"role":"user","content":"x"}],"top_k":7,"min_p":0.05,'
        b'"guided_json":{"type":"object","properties":{"a":{"type":"integer"}}},"temperature":1.50,'
        b'"response_format":{"type":"json_object"},"tools":[{"type":"function","function":{"name":"f"}}],'
        b'"stream":true}'
    )
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", content=body, timeout=10) as response:
        assert response.status_code == 200
        response.read()
    (request,) = upstream.requests("/v1/chat/completions")
    assert base64.b64decode(request["body_b64"]) == body


def test_sdk_extra_body_passes_through(client: openai.OpenAI, upstream: Upstream) -> None:
    client.chat.completions.create(
        model="fake-model", messages=MESSAGES, extra_body={"top_k": 5, "guided_choice": ["a", "b"]}
    )
    (request,) = upstream.requests("/v1/chat/completions")
    assert request["body"]["top_k"] == 5 and request["body"]["guided_choice"] == ["a", "b"]


def test_alias_reaches_upstream_as_served_name(client: openai.OpenAI, upstream: Upstream) -> None:
    completion = client.chat.completions.create(model="fast", messages=MESSAGES, extra_body={"top_k": 3})
    (request,) = upstream.requests("/v1/chat/completions")
    assert request["body"]["model"] == "fake-model" and request["body"]["top_k"] == 3
    assert completion.model == "fake-model"


def test_request_id_round_trip(gateway: Gateway, upstream: Upstream) -> None:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "fake-model", "messages": MESSAGES},
        headers={"x-request-id": "req-42"},
        timeout=10,
    )
    assert response.headers["x-request-id"] == "req-42"
    assert upstream.requests("/v1/chat/completions")[0]["headers"]["x-request-id"] == "req-42"


def test_other_endpoints(client: openai.OpenAI, upstream: Upstream) -> None:
    assert client.completions.create(model="fake-model", prompt="x", max_tokens=2).choices[0].text == "tok0 tok1"
    assert len(client.embeddings.create(model="fake-model", input="x").data[0].embedding) == 8
    response = client.responses.create(model="fast", input="hello")
    assert response.output_text
    assert [r["path"] for r in upstream.requests() if r["method"] == "POST"] == [
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ]


# --- errors, each as the SDK's exception class --------------------------------------------------


def test_malformed_json_is_400(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions", content=b'{"model": ', timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_missing_messages_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=openai.omit)  # type: ignore[arg-type]
    assert info.value.param == "messages"


def test_non_string_model_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=7, messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.param == "model"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_body_over_limit_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x" * 40_000_000}])
    assert info.value.status_code == 413 and info.value.code == "payload_too_large"


def test_a_chunked_body_over_the_limit_is_413_as_it_arrives(gateway: Gateway) -> None:
    # No content-length to refuse it by: the gateway counts what arrives (32 MiB by default).
    def body() -> Iterator[bytes]:
        yield b'{"model":"fake-model","input":"'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    response = httpx.post(f"{gateway.base_url}/embeddings", content=body(), timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_unreachable_upstream_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="dead-model", messages=MESSAGES)
    assert info.value.status_code == 502 and info.value.code == "upstream_unavailable"


def test_known_model_without_backend_is_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="ghost", messages=MESSAGES)
    assert info.value.status_code == 503 and info.value.code == "no_backend_available"


def test_first_token_timeout_is_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            extra_body={"fake_scenario": "slow_first_token", "fake_delay": 3},
        )
    assert info.value.status_code == 504 and info.value.code == "upstream_timeout"
    assert "sent no first token within 1 s" in info.value.message


@pytest.mark.parametrize(
    ("scenario", "exception", "status"),
    [
        ("error_400", openai.BadRequestError, 400),
        ("error_429", openai.RateLimitError, 429),
        ("error_500", openai.InternalServerError, 500),
        ("error_plain_500", openai.InternalServerError, 500),
    ],
)
def test_upstream_errors_passed_through(
    client: openai.OpenAI, scenario: str, exception: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(exception) as info:
        client.chat.completions.create(model="fake-model", messages=MESSAGES, extra_body={"fake_scenario": scenario})
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and info.value.body.get("message")
    if scenario == "error_400":
        assert (info.value.code, info.value.param) == ("fake_code", "messages")
    if scenario == "error_429":
        assert info.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("scenario", ["drop_mid_stream", "garbage_mid_stream", "truncate", "inband_error"])
def test_mid_stream_failure_raises_api_error(client: openai.OpenAI, scenario: str) -> None:
    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True, max_tokens=5, extra_body={"fake_scenario": scenario}
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert received, "the chunks before the failure reach the client"
    assert info.value.message


def test_idle_upstream_mid_stream_is_an_error_event(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True, max_tokens=3, extra_body={"fake_token_delay": 2.0}
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert info.value.code == "idle_timeout"


def test_client_disconnect_closes_upstream(gateway: Gateway, upstream: Upstream) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True, "max_tokens": 50, "fake_token_delay": 0.1}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, timeout=10, headers={"x-request-id": "leaving"}
    ) as response:
        lines = response.iter_lines()
        seen = [line for line, _ in zip(lines, range(4), strict=False)]
        assert any(line.startswith("data: ") for line in seen)
    # The upstream sees its connection closed long before the 5 s the reply would have taken.
    event = upstream.wait_event("disconnect", request_id="leaving", timeout=2)
    assert event["path"] == "/v1/chat/completions"
    assert not [e for e in upstream.events() if e["type"] == "completed" and e["request_id"] == "leaving"]


def test_ready_reports_each_backend(gateway: Gateway) -> None:
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 200
    backends = ready.json()["components"]["backends"]
    assert backends["fake"]["state"] == "up" and backends["mock"]["state"] == "up"


async def test_hundred_concurrent_streams_complete_and_correct(gateway: Gateway) -> None:
    client = gateway.async_client(timeout=30)

    async def one(i: int) -> tuple[int, str, str | None]:
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            max_tokens=1 + i % 20,
            extra_body={"fake_token_delay": 0.01},
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return i, text, finish

    results = await asyncio.gather(*(one(i) for i in range(100)))
    await client.close()
    for i, text, finish in results:
        assert text == " ".join(f"tok{n}" for n in range(1 + i % 20)), i
        assert finish == "length"


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('[shutdown]\ndrain_delay = 0.2\n[[backends]]\nname = "mock"\nkind = "mock"\n')
    process = Gateway(config, tmp_path, name="sigterm").start()
    assert process.stop(signal.SIGTERM) == 0


def test_models_refreshed_and_readiness_follows(tmp_path: Path, start_gateway: Any) -> None:
    """A backend that is down at start-up is not ready; once it answers, the periodic discovery finds
    its models and the replica turns ready."""
    late = Upstream(tmp_path, models=("late-model",), name="late")
    gateway = start_gateway(f"""
[discovery]
interval = 0.3

[[backends]]
name = "late"
kind = "vllm"
base_url = "{late.base_url}"
""")
    ready = httpx.get(f"{gateway.url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["components"]["backends"]["late"]["state"] == "down"
    with pytest.raises(openai.NotFoundError):
        gateway.client().chat.completions.create(model="late-model", messages=MESSAGES)
    late.start()
    try:
        deadline = time.monotonic() + 5
        while httpx.get(f"{gateway.url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "discovery never found the backend"
            time.sleep(0.1)
        assert [m.id for m in gateway.client().models.list()] == ["late-model"]
        reply = gateway.client().chat.completions.create(model="late-model", messages=MESSAGES)
        assert reply.choices[0].message.content
    finally:
        late.stop()


def test_without_history_the_reply_is_still_read_for_its_id_and_usage(
    upstream_module: Upstream, start_gateway: Any
) -> None:
    """With nothing keeping the message (no history, no body logs), the gateway decodes only a reply's
    id and usage: the SSE ids still carry the completion's id, and the tokens are still counted."""
    gateway = start_gateway(f"""
[history]
store_all = false

[[backends]]
name = "fake"
kind = "vllm"
base_url = "{upstream_module.base_url}"
""")
    client = gateway.client(timeout=10)
    completion = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
    assert completion.choices[0].message.content == "tok0 tok1 tok2"
    body = {
        "model": "fake-model",
        "messages": MESSAGES,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=10) as response:
        events = [line for line in response.iter_lines() if line]
    ids = [line[4:] for line in events if line.startswith("id: ")]
    first = json.loads(next(line[6:] for line in events if line.startswith("data: {")))
    assert ids and all(i.startswith(first["id"] + "/") for i in ids[1:])
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    completed = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_tokens_total{") and 'type="completion"' in line
    ]
    assert sum(completed) == 3 + 4  # the non-streamed answer's usage, then the stream's usage chunk
