"""The hot routes' responses on their own, driven by hand-made ASGI receive and send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.responses import STREAM_HEADERS, EventStream, WholeReply, _Disconnect


class Client:
    """The ASGI server's side: what was sent, and a disconnect to deliver on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.complete = asyncio.Event()
        self.body_started = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        # As uvicorn does: nothing until the client leaves or the response is complete.
        waiters = [asyncio.ensure_future(self.gone.wait()), asyncio.ensure_future(self.complete.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.body_started.set()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


class Events:
    """An event source that waits ``pause`` seconds before each event after the first."""

    def __init__(self, *events: bytes, pause: float = 0.0) -> None:
        self.events = events
        self.pause = pause
        self.closed = False

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            for i, event in enumerate(self.events):
                if i and self.pause:
                    await asyncio.sleep(self.pause)
                yield event
        finally:
            self.closed = True


async def test_event_stream_sends_each_event_then_runs_its_background_once() -> None:
    client, events, ran = Client(), Events(b"data: a\n\n", b"data: b\n\n"), []

    async def background() -> None:
        ran.append(True)

    stream = EventStream(events(), [*STREAM_HEADERS, (b"x-ratelimit-remaining-requests", b"9")], background)
    await stream.to_asgi_response(None, None)(None, client.receive, client.send)

    start = client.sent[0]
    assert start["status"] == 200
    assert dict(start["headers"]) == {
        b"content-type": b"text/event-stream; charset=utf-8",
        b"cache-control": b"no-cache",
        b"x-accel-buffering": b"no",
        b"x-ratelimit-remaining-requests": b"9",
    }
    assert client.bodies() == [b"data: a\n\n", b"data: b\n\n", b""]
    assert [m.get("more_body") for m in client.sent[1:]] == [True, True, False]
    assert ran == [True] and events.closed
    await asyncio.sleep(0.01)  # the disconnect listener, woken by the end, cancels nothing
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_client_that_leaves_stops_the_events_and_the_background_still_runs() -> None:
    client, events, ran = Client(), Events(b"data: a\n\n", b"data: b\n\n", pause=5.0), []

    async def background() -> None:
        ran.append(events.closed)

    task = asyncio.ensure_future(
        EventStream(events(), background=background).to_asgi_response(None, None)(None, client.receive, client.send)
    )
    await asyncio.wait_for(client.body_started.wait(), 1)
    client.gone.set()  # while the source waits for its next event
    await asyncio.wait_for(task, 1)  # returns, not raises: the client leaving is a normal end
    assert client.bodies() == [b"data: a\n\n"]
    assert ran == [True], "the source was closed before the background work ran"


async def test_a_stream_cancelled_from_elsewhere_stays_cancelled() -> None:
    client, events, ran = Client(), Events(b"data: a\n\n", b"data: b\n\n", pause=5.0), []

    async def background() -> None:
        ran.append(True)

    task = asyncio.ensure_future(
        EventStream(events(), background=background).to_asgi_response(None, None)(None, client.receive, client.send)
    )
    await asyncio.wait_for(client.body_started.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == [] and events.closed


async def test_whole_reply_is_one_start_and_one_body_then_its_background() -> None:
    client, ran = Client(), []

    async def background() -> None:
        ran.append(client.complete.is_set())

    reply = WholeReply(b'{"ok":true}', 201, "application/json", [(b"x-a", b"1")], background)
    await reply.to_asgi_response(None, None)(None, client.receive, client.send)
    assert client.sent[0] == {
        "type": "http.response.start",
        "status": 201,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"11"), (b"x-a", b"1")],
    }
    assert client.bodies() == [b'{"ok":true}'] and ran == [True]


async def test_the_disconnect_listener_drives_receive_through_futures_and_bare_yields() -> None:
    gone, messages, left = asyncio.Event(), [], []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)  # a bare yield: stepped again by the loop
        if not messages:
            messages.append("body")
            return {"type": "http.request", "body": b"", "more_body": False}  # not a disconnect: listen on
        await gone.wait()  # a future
        return {"type": "http.disconnect"}

    listener = _Disconnect(receive, lambda: left.append(True))
    await asyncio.sleep(0.01)
    assert left == [] and messages == ["body"]
    gone.set()
    await asyncio.sleep(0.01)
    assert left == [True]
    listener.close()  # after the disconnect: nothing left to do


async def test_a_closed_disconnect_listener_stops_listening_and_releases_receive() -> None:
    gone, left, released = asyncio.Event(), [], []

    async def receive() -> dict[str, Any]:
        try:
            await gone.wait()
        finally:
            released.append(True)
        return {"type": "http.disconnect"}

    listener = _Disconnect(receive, lambda: left.append(True))
    listener.close()
    assert released == [True]
    gone.set()
    await asyncio.sleep(0.01)
    assert left == []


async def test_a_receive_that_fails_is_not_a_disconnect() -> None:
    left = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        raise RuntimeError("the server's own failure")

    _Disconnect(receive, lambda: left.append(True))
    await asyncio.sleep(0.01)
    assert left == []
