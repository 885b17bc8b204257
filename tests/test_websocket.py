"""``/v1/chat/ws``: chat completions over a WebSocket, in front of the fake upstream as a real process.

Most tests run the app in-process behind Litestar's ``TestClient``: uvicorn serves WebSockets only with
the ``websockets`` (or ``wsproto``) package installed, and the project does not depend on one yet. The
tests at the end run ``gateway serve`` and a real WebSocket client, and are skipped without
``websockets``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar.exceptions import WebSocketDisconnect
from litestar.testing import TestClient
from litestar.testing.websocket_test_session import WebSocketTestSession

from gateway.app import create_app
from gateway.settings import load_file
from tests.conftest import GatewayFactory, Upstream

T = TypeVar("T")

KEY = "sk-ws-team-0123456789"
SLOW = {"max_tokens": 50, "fake_token_delay": 0.1}
"""A reply of 50 chunks, 0.1 s apart: five seconds, long enough to interrupt."""


def config(upstream: Upstream, extra: str = "") -> str:
    return f"""
[timeouts]
first_token = 5.0
idle = 5.0

[retries]
max_attempts = 1

{upstream.backend_toml()}{extra}
"""


KEYS = f"""
[[keys]]
name = "ws-team"
key = "{KEY}"
"""


def app_client(tmp_path: Path, toml: str) -> TestClient[Any]:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return TestClient(create_app(load_file(path)), timeout=10)


@pytest.fixture
def client(upstream: Upstream, tmp_path: Path) -> Iterator[TestClient[Any]]:
    with app_client(tmp_path, config(upstream)) as test_client:
        yield test_client


@pytest.fixture
def ws(client: TestClient[Any]) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect("/v1/chat/ws") as session:
        yield session


def chat(content: str = "hello socket", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def ask(ws: WebSocketTestSession, body: dict[str, Any] | str) -> list[str]:
    ws.send_text(body if isinstance(body, str) else json.dumps(body))
    return answer(ws)


def answer(ws: WebSocketTestSession, timeout: float = 10) -> list[str]:
    """The frames of one answer, up to and without its ``[DONE]``."""
    frames = []
    while (frame := ws.receive_text(timeout=timeout)) != "[DONE]":
        frames.append(frame)
    return frames


def text_of(frames: list[str]) -> str:
    chunks = [json.loads(frame) for frame in frames]
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def without_id(payload: str) -> dict[str, Any]:
    # The fake upstream numbers its completions; everything else must be the same.
    decoded = json.loads(payload)
    decoded.pop("id", None)
    return decoded


def eventually(probe: Callable[[], T], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {probe}")
        time.sleep(0.05)
    return value


def test_stream_sends_the_upstream_chunks_as_the_http_stream_does(
    client: TestClient[Any], ws: WebSocketTestSession
) -> None:
    body = chat(stream=True, max_tokens=6, stream_options={"include_usage": True})
    frames = ask(ws, body)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [without_id(frame) for frame in frames] == [without_id(data) for data in events[:-1]]
    assert text_of(frames) == text_of(events[:-1]) == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert json.loads(frames[-1])["usage"]["completion_tokens"] == 6


def test_requests_follow_each_other_on_one_socket(ws: WebSocketTestSession, upstream: Upstream) -> None:
    assert text_of(ask(ws, chat(stream=True, max_tokens=2))) == "tok0 tok1"
    assert text_of(ask(ws, chat(stream=True, max_tokens=3))) == "tok0 tok1 tok2"
    # Sent before the first is answered: queued, and answered in order.
    ws.send_text(json.dumps(chat(stream=True, max_tokens=4, fake_token_delay=0.05)))
    ws.send_text(json.dumps(chat(stream=True, max_tokens=1)))
    assert text_of(answer(ws)) == "tok0 tok1 tok2 tok3"
    assert text_of(answer(ws)) == "tok0"
    chats = upstream.requests("/v1/chat/completions")
    ids = [request["headers"]["x-request-id"] for request in chats]
    assert len(ids) == len(set(ids)) == 4  # one request id per request, not per socket
    assert len({request_id.rsplit("-", 1)[0] for request_id in ids}) == 1


def test_non_stream_request_is_one_frame(ws: WebSocketTestSession) -> None:
    frames = ask(ws, chat(max_tokens=3))
    assert len(frames) == 1
    completion = json.loads(frames[0])
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "tok0 tok1 tok2"


def test_errors_are_frames_and_the_socket_stays_usable(ws: WebSocketTestSession) -> None:
    [frame] = ask(ws, {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert json.loads(frame) == {
        "error": {
            "message": "The model `no-such-model` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    [frame] = ask(ws, "{not json")
    assert json.loads(frame)["error"]["code"] == "invalid_json"
    [frame] = ask(ws, chat(stream=True, fake_scenario="error_500"))
    assert json.loads(frame)["error"]["message"] == "fake server error"
    assert text_of(ask(ws, chat(stream=True, max_tokens=2))) == "tok0 tok1"


def test_a_failure_mid_stream_ends_with_its_error_frame(ws: WebSocketTestSession) -> None:
    frames = ask(ws, chat(stream=True, fake_scenario="inband_error"))
    assert json.loads(frames[-1])["error"]["code"] == "fake_inband"
    assert text_of(frames[:-1]) == "tok0"
    frames = ask(ws, chat(stream=True, max_tokens=10, fake_scenario="drop_mid_stream"))
    assert json.loads(frames[-1])["error"]["code"] == "upstream_disconnected"


def test_cancel_stops_the_generation(client: TestClient[Any], ws: WebSocketTestSession, upstream: Upstream) -> None:
    ws.send_text('{"type": "cancel"}')  # nothing runs: ignored
    ws.send_text(json.dumps(chat(stream=True, **SLOW)))
    started = time.monotonic()
    first = [json.loads(ws.receive_text(timeout=5)) for _ in range(3)]
    ws.send_text('{"type": "cancel"}')
    frames = answer(ws, timeout=5)
    assert time.monotonic() - started < 2.5  # the whole reply takes 5 s
    last = json.loads(frames[-1])
    assert last == {
        "id": first[0]["id"],
        "object": "chat.completion.chunk",
        "created": first[0]["created"],
        "model": "fake-model",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "cancelled"}],
    }
    assert all("cancelled" not in frame for frame in frames[:-1])
    upstream.wait_event("disconnect")
    # The partial reply is in history, as cancelled.
    stored = eventually(lambda: client.get(f"/v1/chat/completions/{last['id']}").json().get("choices"))
    assert stored[0]["finish_reason"] == "cancelled"
    assert stored[0]["message"]["content"].startswith("tok0 tok1")
    # The socket goes on.
    assert text_of(ask(ws, chat(stream=True, max_tokens=2))) == "tok0 tok1"


def test_cancel_before_the_first_chunk(ws: WebSocketTestSession, upstream: Upstream) -> None:
    slow_start = chat(stream=True, fake_scenario="slow_first_token", fake_delay=1.0, **SLOW)
    for wait_for_upstream in (False, True):
        upstream.clear()
        ws.send_text(json.dumps(slow_start))
        if wait_for_upstream:
            upstream.wait_event("started")
        ws.send_text('{"type": "cancel"}')
        started = time.monotonic()
        [frame] = answer(ws, timeout=5)
        assert time.monotonic() - started < 0.5  # not held up by the first token, a second away
        cancelled = json.loads(frame)
        assert cancelled["id"].startswith("chatcmpl-")
        assert cancelled["model"] == "fake-model"
        assert cancelled["choices"] == [{"index": 0, "delta": {}, "finish_reason": "cancelled"}]
    # The request already sent upstream is dropped once it answers; the next one does not wait for it.
    assert text_of(ask(ws, chat(stream=True, max_tokens=2))) == "tok0 tok1"
    upstream.wait_event("disconnect")


def test_a_client_that_leaves_closes_the_upstream(client: TestClient[Any], upstream: Upstream) -> None:
    with client.websocket_connect("/v1/chat/ws") as ws:
        ws.send_text(json.dumps(chat(stream=True, **SLOW)))
        ws.receive_text(timeout=5)
    event = upstream.wait_event("disconnect")
    assert event["path"] == "/v1/chat/completions"


def test_the_handshake_needs_a_key(upstream: Upstream, tmp_path: Path) -> None:
    with app_client(tmp_path, config(upstream, KEYS)) as client:
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/chat/ws"):
            pass
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/v1/chat/ws", headers={"Authorization": "Bearer sk-wrong"}),
        ):
            pass
        with client.websocket_connect("/v1/chat/ws", headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert text_of(ask(ws, chat(stream=True, max_tokens=2))) == "tok0 tok1"


def test_a_conversation_keeps_its_history(
    client: TestClient[Any], ws: WebSocketTestSession, upstream: Upstream
) -> None:
    conversation = client.post("/v1/conversations", json={}).json()["id"]
    first = ask(ws, chat("my name is Ada", stream=True, max_tokens=2, conversation=conversation))
    assert text_of(first) == "tok0 tok1"
    ask(ws, chat("what is my name?", max_tokens=2, conversation=conversation))
    sent = upstream.requests("/v1/chat/completions")[-1]["body"]
    assert "conversation" not in sent
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "my name is Ada"),
        ("assistant", "tok0 tok1"),
        ("user", "what is my name?"),
    ]


# The gateway as users run it. uvicorn needs `websockets` to serve WebSockets, and these tests use its
# client: both come with the one package.


@pytest.fixture
def served(upstream: Upstream, start_gateway: GatewayFactory) -> str:
    pytest.importorskip("websockets")
    gateway = start_gateway(config(upstream, KEYS))
    return gateway.url.replace("http://", "ws://") + "/v1/chat/ws"


def test_served_socket_streams_cancels_and_closes_the_upstream(served: str, upstream: Upstream) -> None:
    from websockets.sync.client import connect

    with connect(served, additional_headers={"Authorization": f"Bearer {KEY}"}) as socket:
        socket.send(json.dumps(chat(stream=True, max_tokens=3)))
        frames = list(iter(lambda: socket.recv(timeout=5), "[DONE]"))
        assert text_of(frames) == "tok0 tok1 tok2"
        socket.send(json.dumps(chat(stream=True, **SLOW)))
        socket.recv(timeout=5)
        socket.send('{"type": "cancel"}')
        frames = list(iter(lambda: socket.recv(timeout=2), "[DONE]"))
        assert json.loads(frames[-1])["choices"][0]["finish_reason"] == "cancelled"
        upstream.wait_event("disconnect")
        upstream.clear()
        socket.send(json.dumps(chat(stream=True, **SLOW)))
        socket.recv(timeout=5)
    upstream.wait_event("disconnect")


def test_served_handshake_without_a_key_is_refused(served: str) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as refused:
        connect(served)
    assert refused.value.response.status_code == 403


def test_cancel_stops_a_resumable_generation(
    client: TestClient[Any], ws: WebSocketTestSession, upstream: Upstream
) -> None:
    # A conversation's stream is resumable: its generation outlives the stream that follows it.
    conversation = client.post("/v1/conversations", json={}).json()["id"]
    ws.send_text(json.dumps(chat(stream=True, conversation=conversation, **SLOW)))
    first = [json.loads(ws.receive_text(timeout=5)) for _ in range(3)]
    ws.send_text('{"type": "cancel"}')
    frames = answer(ws, timeout=5)
    last = json.loads(frames[-1])
    assert last["id"] == first[0]["id"]
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "cancelled"}]
    upstream.wait_event("disconnect", timeout=2)


def test_each_request_on_a_socket_gets_its_access_line_and_metrics(
    client: TestClient[Any], ws: WebSocketTestSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    streamed = chat(stream=True, max_tokens=3, stream_options={"include_usage": True})
    assert text_of(ask(ws, streamed)) == "tok0 tok1 tok2"
    ask(ws, chat(model="no-such-model"))
    ask(ws, chat(max_tokens=2))

    def access_lines() -> list[dict[str, Any]] | None:
        # Reported once each answer's [DONE] has gone out: the last one may still be on its way.
        found = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
        return found if len(found) >= 3 else None

    lines = eventually(access_lines)
    assert [line["path"] for line in lines] == ["/v1/chat/ws"] * 3
    assert [line["status"] for line in lines] == [200, 404, 200]
    assert [line["method"] for line in lines] == ["WEBSOCKET"] * 3
    assert lines[0]["model"] == "fake-model" and lines[0]["completion_tokens"] == 3
    assert lines[0]["request_id"].endswith("-1") and lines[2]["request_id"].endswith("-3")
    assert all("hello socket" not in str(line) for line in lines)  # no message text without log_bodies
    scrape = client.get("/metrics").text
    assert 'gateway_requests_total{backend="fake",model="fake-model",route="/v1/chat/ws",status="200"} 2.0' in scrape
    assert 'route="/v1/chat/ws",status="404"} 1.0' in scrape
