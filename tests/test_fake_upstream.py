"""The fake upstream and the process fixtures, checked directly (no gateway involved)."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import redis

if TYPE_CHECKING:
    from conftest import RedisServer, SharedRedis, Upstream, UpstreamFactory

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]


def _sdk(upstream: Upstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url, api_key="x", max_retries=0)


def _http(upstream: Upstream, **kwargs: Any) -> httpx.Client:
    kwargs.setdefault("timeout", 5)
    return httpx.Client(base_url=upstream.url, trust_env=False, **kwargs)


def _chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MESSAGES, "stream": stream, **extra}


def _events(raw: bytes) -> list[bytes]:
    """The payloads of a complete SSE body, checking each event is exactly `data: ...\\n\\n`."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    parts = raw[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts), parts
    return [p[len(b"data: ") :] for p in parts]


def _stream_raw(upstream: Upstream, body: dict[str, Any]) -> bytes:
    with _http(upstream) as client:
        response = client.post(CHAT, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    return response.content


def test_models_and_health(upstream_module: Upstream) -> None:
    models = _sdk(upstream_module).models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("fake-model", "fake")]
    with _http(upstream_module) as client:
        assert client.get("/health").json() == {}
        assert client.get("/v1/nope").status_code == 404


def test_models_list_from_arguments(start_upstream: UpstreamFactory) -> None:
    server = start_upstream(models=["a", "b"], name="vllm-1")
    data = _sdk(server).models.list().data
    assert [(m.id, m.owned_by) for m in data] == [("a", "vllm-1"), ("b", "vllm-1")]
    with _http(server) as client:
        assert client.get("/health").headers["x-fake-upstream"] == "vllm-1"


def test_chat_non_stream(upstream_module: Upstream) -> None:
    client = _sdk(upstream_module)
    completion = client.chat.completions.create(model="m-echo", messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-fake-")
    assert completion.model == "m-echo"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 5)

    limited = client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=2, n=3)
    assert [c.index for c in limited.choices] == [0, 1, 2]
    assert {(c.message.content, c.finish_reason) for c in limited.choices} == {("tok0 tok1", "length")}


def test_chat_stream_with_usage(upstream_module: Upstream) -> None:
    stream = _sdk(upstream_module).chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (10, 3)

    events = _events(_stream_raw(upstream_module, _chat(max_tokens=3)))
    assert events[-1] == b"[DONE]"
    assert len(events) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]: no usage unless asked


def test_completions(upstream_module: Upstream) -> None:
    client = _sdk(upstream_module)
    completion = client.completions.create(model="fake-model", prompt="hi")
    assert completion.choices[0].text == "tok0 tok1 tok2 tok3 tok4"
    stream = client.completions.create(
        model="fake-model", prompt="hi", max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_embeddings(upstream_module: Upstream) -> None:
    client = _sdk(upstream_module)
    floats = client.embeddings.create(model="e", input=["a", "b"], encoding_format="float")
    vectors = [d.embedding for d in floats.data]
    assert [len(v) for v in vectors] == [8, 8] and vectors[0] != vectors[1]
    again = client.embeddings.create(model="e", input="a", encoding_format="float")
    assert again.data[0].embedding == vectors[0]

    with _http(upstream_module) as http:
        raw = http.post("/v1/embeddings", json={"model": "e", "input": "a", "encoding_format": "base64"})
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert list(struct.unpack("<8f", packed)) == vectors[0]


def test_responses(upstream_module: Upstream) -> None:
    response = _sdk(upstream_module).responses.create(model="fake-model", input="hi", max_output_tokens=3)
    assert response.id.startswith("resp_")
    assert response.output_text == "tok0 tok1 tok2"


@pytest.mark.parametrize(
    ("scenario", "error"),
    [
        ("error_400", openai.BadRequestError),
        ("error_429", openai.RateLimitError),
        ("error_500", openai.InternalServerError),
        ("error_plain_500", openai.InternalServerError),
        ("no_such_scenario", openai.BadRequestError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_error_scenarios(upstream_module: Upstream, scenario: str, error: type[Exception], stream: bool) -> None:
    with pytest.raises(error):
        _sdk(upstream_module).chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=stream, extra_body={"fake_scenario": scenario}
        )


def test_error_bodies(upstream_module: Upstream) -> None:
    with _http(upstream_module) as client:
        bad = client.post(CHAT, json=_chat(fake_scenario="error_400"))
        limited = client.post(CHAT, json=_chat(fake_scenario="error_429"))
        plain = client.post(CHAT, json=_chat(fake_scenario="error_plain_500"))
        malformed = client.post(CHAT, content=b'{"model": ', headers={"content-type": "application/json"})
    assert bad.json() == {
        "error": {
            "message": "fake bad request",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "fake_code",
        }
    }
    assert limited.headers["retry-after"] == "1"
    assert plain.text == "Internal Server Error"
    assert plain.headers["content-type"].startswith("text/plain")
    assert malformed.status_code == 400


def test_slow_first_token(upstream_module: Upstream) -> None:
    body = _chat(fake_scenario="slow_first_token", fake_delay=0.5)
    with _http(upstream_module) as client:
        started = time.monotonic()
        with client.stream("POST", CHAT, json=body) as response:
            headers_after = time.monotonic() - started
            first = next(response.iter_bytes())
            first_after = time.monotonic() - started
            assert first.startswith(b"data: ")
    assert headers_after < 0.4 <= 0.5 <= first_after


def test_hang_stops_when_client_leaves(upstream_module: Upstream) -> None:
    request_id = uuid.uuid4().hex
    with (
        _http(upstream_module, timeout=httpx.Timeout(5, read=0.3)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(CHAT, json=_chat(fake_scenario="hang"), headers={"x-request-id": request_id})
    assert upstream_module.wait_event("disconnect", request_id, timeout=2)["path"] == CHAT


def test_drop_mid_stream(upstream_module: Upstream) -> None:
    received = b""
    with _http(upstream_module) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            with client.stream("POST", CHAT, json=_chat(fake_scenario="drop_mid_stream")) as response:
                for data in response.iter_bytes():
                    received += data
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(CHAT, json=_chat(stream=False, fake_scenario="drop_mid_stream"))
    assert len(_events(received)) == 2


def test_garbage_mid_stream(upstream_module: Upstream) -> None:
    events = _events(_stream_raw(upstream_module, _chat(fake_scenario="garbage_mid_stream")))
    assert events[2] == b"this is not json"
    assert events[-1] == b"[DONE]"
    assert len(events) == 1 + 5 + 1 + 1 + 1


def test_truncate(upstream_module: Upstream) -> None:
    events = _events(_stream_raw(upstream_module, _chat(fake_scenario="truncate")))
    assert len(events) == 1 + 5
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events)


def test_inband_error(upstream_module: Upstream) -> None:
    events = _events(_stream_raw(upstream_module, _chat(fake_scenario="inband_error")))
    assert len(events) == 3
    assert json.loads(events[2])["error"]["code"] == "fake_inband"


def test_stream_events(upstream_module: Upstream) -> None:
    request_id = uuid.uuid4().hex
    with _http(upstream_module, headers={"x-request-id": request_id}) as client:
        client.post(CHAT, json=_chat())
    types = [e["type"] for e in upstream_module.events() if e["request_id"] == request_id]
    assert types == ["started", "completed"]


def test_disconnect_mid_stream_is_recorded(upstream_module: Upstream) -> None:
    request_id = uuid.uuid4().hex
    body = _chat(fake_token_delay=0.2)
    received = b""
    with _http(upstream_module) as client:
        with client.stream("POST", CHAT, json=body, headers={"x-request-id": request_id}) as response:
            for data in response.iter_bytes():
                received += data
                if received.count(b"\n\n") >= 2:
                    break
    started = time.monotonic()
    upstream_module.wait_event("disconnect", request_id, timeout=2)
    assert time.monotonic() - started < 1
    assert not [e for e in upstream_module.events() if e["type"] == "completed" and e["request_id"] == request_id]


def test_requests_recorded_byte_for_byte(upstream_module: Upstream) -> None:
    # Hand-written bytes: an unknown field, a nested object, a float that re-encoding would turn to 1.5.
    raw = (
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],'
        b' "top_k": 7, "guided_json": {"type": "object", "properties": {}}, "temperature": 1.50}'
    )
    with _http(upstream_module) as client:
        client.post(CHAT, content=raw, headers={"content-type": "application/json", "X-Custom": "v"})
    [record] = upstream_module.requests()
    assert record["method"] == "POST" and record["path"] == CHAT
    assert base64.b64decode(record["body_b64"]) == raw
    assert record["body"]["guided_json"] == {"type": "object", "properties": {}}
    assert record["headers"]["x-custom"] == "v"

    upstream_module.clear()
    assert upstream_module.requests() == [] and upstream_module.events() == []


def test_upstream_stop_and_start(upstream: Upstream) -> None:
    upstream.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{upstream.url}/health", trust_env=False)
    upstream.start()
    assert httpx.get(f"{upstream.url}/health", trust_env=False).status_code == 200


def test_redis_stop_and_start(redis_server: RedisServer | SharedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.set("k", "v") and client.ping()
        redis_server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        redis_server.start()
        assert client.ping()
        assert client.get("k") is None  # no persistence: a restart starts empty
    finally:
        client.close()
