"""The relay on its own, against upstreams faked by pytest-httpx."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from litestar.response import Stream
from pytest_httpx import HTTPXMock

from gateway.backends import Backend
from gateway.deadline import Deadline
from gateway.errors import UpstreamProtocolError, UpstreamStatus, UpstreamTimeout, UpstreamUnavailable
from gateway.relay import forward
from gateway.reply import Reply
from gateway.routing import Route, Target
from gateway.settings import BackendSettings, GuardSettings, RetrySettings, Settings, TimeoutSettings

URL = "http://upstream/v1/chat/completions"


class Chunks(httpx.AsyncByteStream):
    """An upstream body: bytes are sent, a float is a pause, an exception is raised where it stands."""

    def __init__(self, *parts: bytes | float | BaseException) -> None:
        self.parts = parts
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, BaseException):
                raise part
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                yield part

    async def aclose(self) -> None:
        self.closed = True


def chunk(content: str | None = None, finish: str | None = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    async with httpx.AsyncClient() as client:
        yield Backend(BackendSettings(name="up", kind="openai", base_url="http://upstream/v1", models=["m"]), client)


# One attempt: these tests are about one exchange; retries have their own below.
SETTINGS = Settings(retries=RetrySettings(max_attempts=1))


def route(*backends: Backend) -> Route:
    return Route(model="m", served="m", targets=tuple(Target(b, "m") for b in backends))


async def relay(
    backend: Backend,
    *,
    stream: bool = True,
    timeouts: TimeoutSettings | None = None,
    reply: Reply | None = None,
    path: str = "/chat/completions",
) -> list[bytes]:
    backend.timeouts = timeouts or TimeoutSettings()
    response = await forward(
        route(backend),
        path,
        b'{"model":"m"}',
        request_id="rid",
        stream=stream,
        settings=SETTINGS,
        reply=reply,
    )
    assert isinstance(response, Stream)
    parts = [part async for part in response.iterator]  # type: ignore[union-attr]
    await response.background()  # type: ignore[misc]
    return [unnumbered(part) for part in parts]


def unnumbered(part: bytes) -> bytes:
    """What the upstream sent: the part without the SSE ids the gateway adds."""
    return re.sub(rb"(?m)^id: [^\n]*\n", b"", part)


def error_of(event: bytes) -> dict:
    event = unnumbered(event)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:])["error"]


async def test_stream_relayed_byte_for_byte_and_observed(httpx_mock: HTTPXMock, backend: Backend) -> None:
    role = b'data: {"id":"chatcmpl-1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    tool = (
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
        b'"function":{"name":"get","arguments":"{\\"a\\""}}]}}]}\n\n'
    )
    tool2 = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    upstream = [role, chunk("Hel"), chunk("lo"), tool, tool2, chunk(None, "tool_calls"), usage, DONE]
    # Cut the byte stream at awkward places: events must come out whole and unchanged.
    raw = b"".join(upstream)
    cuts = [raw[:10], raw[10:200], raw[200:201], raw[201:]]
    httpx_mock.add_response(url=URL, stream=Chunks(*cuts), headers={"content-type": "text/event-stream"})
    reply = Reply()
    parts = await relay(backend, reply=reply)
    assert b"".join(parts) == raw
    assert reply.done and reply.error is None
    assert reply.message() == {
        "role": "assistant",
        "content": "Hello",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}],
    }
    assert [choice["finish_reason"] for choice in reply.choices("unfinished")] == ["tool_calls"]
    assert reply.usage is not None and reply.usage.total_tokens == 5
    assert backend.in_flight == 0
    assert reply.backend == "up" and reply.retries == 0
    assert reply.first_token is not None and 0 <= reply.first_token <= reply.upstream_time + 0.05
    assert len(reply.gaps) == len(parts) - 1 and all(gap >= 0 for gap in reply.gaps)


async def test_request_body_sent_unchanged_with_request_id(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a", "stop"), DONE))
    await relay(backend)
    sent = httpx_mock.get_request()
    assert sent is not None
    assert sent.content == b'{"model":"m"}' and sent.headers["x-request-id"] == "rid"
    assert sent.headers["accept"] == "text/event-stream"


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (httpx.ReadError("connection reset"), "upstream_disconnected"),
        (httpx.RemoteProtocolError("incomplete chunked read"), "upstream_disconnected"),
        (httpx.ReadTimeout("timed out"), "idle_timeout"),
    ],
)
async def test_mid_stream_failure_ends_with_error_event(
    httpx_mock: HTTPXMock, backend: Backend, failure: Exception, code: str
) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), chunk("b"), failure))
    reply = Reply()
    parts = await relay(backend, reply=reply)
    assert parts[:2] == [chunk("a"), chunk("b")]
    assert error_of(parts[-1])["code"] == code
    assert not any(DONE in part for part in parts)
    assert reply.error == code and reply.text() == "ab"
    assert backend.in_flight == 0


async def test_garbage_is_not_forwarded(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), b"data: <html>oops</html>\n\n" + chunk("b") + DONE))
    parts = await relay(backend)
    assert parts[0] == chunk("a")
    assert b"oops" not in b"".join(parts)
    assert error_of(parts[-1])["code"] == "upstream_protocol_error"


async def test_stream_without_done_is_truncated_not_complete(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), chunk("b")))
    parts = await relay(backend)
    assert error_of(parts[-1])["code"] == "upstream_truncated"


async def test_inband_upstream_error_passed_on_once(httpx_mock: HTTPXMock, backend: Backend) -> None:
    inband = b'data: {"error":{"message":"engine died","type":"server_error","param":null,"code":"x"}}\n\n'
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), inband))
    reply = Reply()
    parts = await relay(backend, reply=reply)
    assert parts[-1] == inband  # the upstream's own words, and no second error after them
    assert reply.error == "upstream_error"


async def test_total_timeout_mid_stream(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), 0.3, chunk("b"), DONE))
    parts = await relay(backend, timeouts=TimeoutSettings(total=0.2))
    assert error_of(parts[-1])["code"] == "total_timeout"


async def test_first_token_timeout_before_anything_is_sent(httpx_mock: HTTPXMock, backend: Backend) -> None:
    body = Chunks(1.0, chunk("a"), DONE)
    httpx_mock.add_response(url=URL, stream=body)
    with pytest.raises(UpstreamTimeout):
        await relay(backend, timeouts=TimeoutSettings(first_token=0.1))
    assert backend.in_flight == 0


async def test_first_event_garbage_is_an_http_error(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(b"data: nope\n\n"))
    with pytest.raises(UpstreamProtocolError):
        await relay(backend)


async def test_empty_stream_is_an_http_error(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks())
    with pytest.raises(UpstreamProtocolError):
        await relay(backend)
    assert backend.in_flight == 0


async def test_connect_error_is_unavailable(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=URL)
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        await relay(backend)
    assert backend.in_flight == 0


async def test_error_status_passed_through(httpx_mock: HTTPXMock, backend: Backend) -> None:
    body = b'{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"ctx"}}'
    httpx_mock.add_response(url=URL, status_code=400, content=body)
    with pytest.raises(UpstreamStatus) as info:
        await relay(backend)
    assert info.value.status == 400 and info.value.body == body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"object":"error","message":"vllm says no","type":"BadRequestError","code":400}', "vllm says no"),
        (b'{"error":"model \\"x\\" not found"}', 'model "x" not found'),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
    ],
)
async def test_foreign_error_bodies_made_openai_shaped(
    httpx_mock: HTTPXMock, backend: Backend, body: bytes, message: str
) -> None:
    httpx_mock.add_response(url=URL, status_code=503, content=body, headers={"retry-after": "3"})
    with pytest.raises(UpstreamStatus) as info:
        await relay(backend)
    error = json.loads(info.value.body)["error"]
    assert error["message"] == message and set(error) == {"message", "type", "param", "code"}
    assert info.value.status == 503 and info.value.headers == {"retry-after": "3"}


@pytest.mark.parametrize("keep_message", [True, False])
async def test_unary_reply_observed(httpx_mock: HTTPXMock, backend: Backend, keep_message: bool) -> None:
    body = (
        b'{"id":"chatcmpl-9","object":"chat.completion","model":"m","choices":[{"index":0,"message":'
        b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,'
        b'"completion_tokens":1,"total_tokens":2},"x_unknown":1.50}'
    )
    httpx_mock.add_response(url=URL, content=body, headers={"content-type": "application/json"})
    reply = Reply()
    reply.keep_message = keep_message
    response = await forward(
        route(backend),
        "/chat/completions",
        b"{}",
        request_id="r",
        stream=False,
        settings=SETTINGS,
        reply=reply,
    )
    assert response.content == body  # type: ignore[union-attr]
    assert reply.id == "chatcmpl-9" and reply.model == "m" and reply.done
    assert reply.usage is not None and reply.usage.total_tokens == 2
    # The message is read only when someone keeps it (history, body logs).
    assert reply.text() == ("hi" if keep_message else "")
    assert backend.in_flight == 0


async def test_unary_total_timeout(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=URL)
    with pytest.raises(UpstreamTimeout):
        await forward(route(backend), "/chat/completions", b"{}", request_id="r", stream=False, settings=SETTINGS)


async def test_responses_api_stream_ends_at_its_terminal_event(httpx_mock: HTTPXMock, backend: Backend) -> None:
    events = [
        b'event: response.created\ndata: {"type":"response.created"}\n\n',
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}\n\n',
        b'event: response.completed\ndata: {"type":"response.completed"}\n\n',
    ]
    httpx_mock.add_response(url="http://upstream/v1/responses", stream=Chunks(*events))
    parts = await relay(backend, path="/responses")
    assert b"".join(parts) == b"".join(events)


async def test_responses_api_stream_cut_short(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(
        url="http://upstream/v1/responses",
        stream=Chunks(b'event: response.created\ndata: {"type":"response.created"}\n\n'),
    )
    parts = await relay(backend, path="/responses")
    assert error_of(parts[-1])["code"] == "upstream_truncated"


async def test_client_leaving_closes_upstream_and_marks_cancelled(httpx_mock: HTTPXMock, backend: Backend) -> None:
    body = Chunks(chunk("a"), chunk("b"), 5.0, chunk("c"), DONE)
    httpx_mock.add_response(url=URL, stream=body)
    ended: list[Reply] = []

    async def on_end(reply: Reply) -> None:
        ended.append(reply)

    response = await forward(
        route(backend),
        "/chat/completions",
        b"{}",
        request_id="r",
        stream=True,
        settings=SETTINGS,
        reply=Reply(),
        on_end=on_end,
    )
    events = response.iterator  # type: ignore[union-attr]
    assert unnumbered(await anext(events)) == chunk("a")
    await anext(events)
    await events.aclose()  # what the response does when the client disconnects
    await response.background()  # type: ignore[misc]
    assert body.closed
    assert [r.error for r in ended] == ["cancelled"] and ended[0].text() == "ab"
    assert backend.in_flight == 0


# --- retries and failover, before the first byte ------------------------------------------------

OTHER = "http://other/v1/chat/completions"


@pytest.fixture
async def two() -> AsyncIterator[tuple[Backend, Backend]]:
    async with httpx.AsyncClient() as client:
        yield (
            Backend(BackendSettings(name="up", kind="openai", base_url="http://upstream/v1", models=["m"]), client),
            Backend(BackendSettings(name="other", kind="openai", base_url="http://other/v1", models=["m"]), client),
        )


def retrying(attempts: int = 3) -> Settings:
    return Settings(retries=RetrySettings(max_attempts=attempts, backoff=0.01, max_backoff=0.05))


async def test_connect_error_fails_over_to_the_next_backend(
    httpx_mock: HTTPXMock, two: tuple[Backend, Backend]
) -> None:
    first, second = two
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=URL)
    httpx_mock.add_response(url=OTHER, stream=Chunks(chunk("ok", "stop"), DONE))
    reply = Reply()
    response = await forward(
        route(first, second), "/chat/completions", b"{}", request_id="r", stream=True, settings=retrying(), reply=reply
    )
    parts = [part async for part in response.iterator]  # type: ignore[union-attr]
    await response.background()  # type: ignore[misc]
    assert unnumbered(parts[-1]) == DONE and reply.backend == "other" and reply.retries == 1
    assert first.failures == 1 and second.failures == 0


async def test_5xx_retried_on_the_only_backend(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, status_code=503, json={"error": {"message": "busy", "type": "x"}})
    httpx_mock.add_response(url=URL, json={"id": "c", "choices": []})
    reply = Reply()
    response = await forward(
        route(backend), "/chat/completions", b"{}", request_id="r", stream=False, settings=retrying(), reply=reply
    )
    assert response.status_code == 200 and reply.retries == 1  # type: ignore[union-attr]


async def test_4xx_is_not_retried(httpx_mock: HTTPXMock, two: tuple[Backend, Backend]) -> None:
    httpx_mock.add_response(url=URL, status_code=400, json={"error": {"message": "bad", "type": "x"}})
    with pytest.raises(UpstreamStatus):
        await forward(route(*two), "/chat/completions", b"{}", request_id="r", stream=False, settings=retrying())
    assert len(httpx_mock.get_requests()) == 1 and two[0].failures == 0


async def test_429_waits_retry_after_on_the_same_backend(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(
        url=URL,
        status_code=429,
        headers={"retry-after-ms": "300"},
        json={"error": {"message": "slow down", "type": "x"}},
    )
    httpx_mock.add_response(url=URL, json={"id": "c", "choices": []})
    started = asyncio.get_running_loop().time()
    await forward(route(backend), "/chat/completions", b"{}", request_id="r", stream=False, settings=retrying())
    assert asyncio.get_running_loop().time() - started >= 0.3
    assert backend.failures == 0  # busy is not broken


async def test_every_attempt_without_a_first_token_is_504(httpx_mock: HTTPXMock, two: tuple[Backend, Backend]) -> None:
    for backend, url in zip(two, (URL, OTHER), strict=True):
        backend.timeouts = TimeoutSettings(first_token=0.1)
        httpx_mock.add_response(url=url, stream=Chunks(1.0, chunk("late")))
    with pytest.raises(UpstreamTimeout):
        await forward(route(*two), "/chat/completions", b"{}", request_id="r", stream=True, settings=retrying(2))
    assert [b.failures for b in two] == [1, 1] and [b.in_flight for b in two] == [0, 0]


async def test_fallback_target_gets_its_own_model_name(httpx_mock: HTTPXMock, two: tuple[Backend, Backend]) -> None:
    first, second = two
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=URL)
    httpx_mock.add_response(url=OTHER, json={"id": "c", "choices": []})
    fallback_route = Route(model="m", served="m", targets=(Target(first, "m"), Target(second, "small")))
    await forward(
        fallback_route,
        "/chat/completions",
        b'{"model":"m","top_k":3}',
        request_id="r",
        stream=False,
        settings=retrying(),
        changes={"user": "u"},
    )
    sent = httpx_mock.get_requests()[-1].content
    assert sent == b'{"model":"small","top_k":3,"user":"u"}'


async def test_guard_stops_a_looping_stream(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("Sure."), *[chunk(" again") for _ in range(20)], DONE))
    settings = Settings(retries=RetrySettings(max_attempts=1), guard=GuardSettings(repeated_ngram=1, repeats=5))
    reply = Reply()
    response = await forward(
        route(backend), "/chat/completions", b"{}", request_id="r", stream=True, settings=settings, reply=reply
    )
    parts = [part async for part in response.iterator]  # type: ignore[union-attr]
    await response.background()  # type: ignore[misc]
    assert error_of(parts[-1])["code"] == "repetition_detected"
    assert reply.text().count("again") < 10 and not any(DONE in p for p in parts)


async def test_every_event_numbered_with_the_completion_id(httpx_mock: HTTPXMock, backend: Backend) -> None:
    httpx_mock.add_response(
        url=URL, stream=Chunks(chunk("a") + chunk("b"), b": keep-alive\n\n", chunk("c", "stop"), DONE)
    )
    response = await forward(route(backend), "/chat/completions", b"{}", request_id="r", stream=True, settings=SETTINGS)
    body = b"".join([part async for part in response.iterator])  # type: ignore[union-attr]
    await response.background()  # type: ignore[misc]
    assert re.findall(rb"(?m)^id: (.*)$", body) == [b"chatcmpl-1/0", b"chatcmpl-1/1", b"chatcmpl-1/2", b"chatcmpl-1/3"]
    assert b": keep-alive\n\n" in body  # comments pass, unnumbered
    assert body.endswith(b"id: chatcmpl-1/3\ndata: [DONE]\n\n")


async def test_without_the_message_wanted_only_what_the_gateway_needs_is_read(
    httpx_mock: HTTPXMock, backend: Backend
) -> None:
    # No history and no body logging: token chunks are forwarded unread, but the first chunk (the
    # completion's id, for the SSE ids), the usage chunk and an in-band error still are.
    usage = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    spaced = b'data: {"id":"chatcmpl-1","choices": [], "usage": {"prompt_tokens":4,"completion_tokens":5}}\n\n'
    tricky = chunk('she wrote \\"usage\\":{ and \\"error\\"')  # inside a string: escaped, so not matched
    null = b'data: {"id":"chatcmpl-1","choices":[],"usage":null}\n\n'
    upstream = [chunk("Hel"), chunk("lo"), tricky, null, usage, DONE]
    httpx_mock.add_response(url=URL, stream=Chunks(*upstream))
    reply = Reply()
    reply.keep_message = False
    parts = await relay(backend, reply=reply)
    assert b"".join(parts) == b"".join(upstream)
    assert reply.done and reply.id == "chatcmpl-1" and reply.model == "m"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert reply.message()["content"] is None  # the chunks read were read for their id and usage only

    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), spaced, DONE))
    reply = Reply()
    reply.keep_message = False
    await relay(backend, reply=reply)
    assert reply.usage is not None and reply.usage.completion_tokens == 5

    inband = b'data: {"error":{"message":"engine died","type":"server_error","param":null,"code":"x"}}\n\n'
    httpx_mock.add_response(url=URL, stream=Chunks(chunk("a"), chunk("b"), inband))
    reply = Reply()
    reply.keep_message = False
    assert (await relay(backend, reply=reply))[-1] == inband
    assert reply.error == "upstream_error"


async def test_deadline_turns_its_own_cancellation_into_timeout() -> None:
    with pytest.raises(TimeoutError):
        with Deadline(0.01):
            await asyncio.sleep(5)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # no cancellation left pending on the task


async def test_deadline_met_leaves_the_task_alone() -> None:
    with Deadline(0.05):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.1)  # past the deadline: its timer was cancelled with the block
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_deadline_passes_a_cancellation_from_outside_on() -> None:
    entered = asyncio.Event()

    async def waiting() -> None:
        with Deadline(5):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(waiting())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_deadline_and_outside_cancellation_together_stay_a_cancellation() -> None:
    deadlines: list[Deadline] = []

    async def waiting() -> None:
        deadline = Deadline(5)
        deadlines.append(deadline)
        with deadline:
            await asyncio.sleep(5)

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0)
    deadlines[0]._expire()  # time is up ...
    task.cancel()  # ... and the task's owner cancels it, before it runs again
    with pytest.raises(asyncio.CancelledError):
        await task
