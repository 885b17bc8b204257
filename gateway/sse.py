"""Server-sent events, split out of an upstream's byte stream without being rebuilt.

The relay forwards each event as the upstream wrote it, so it needs event boundaries, not parsed
events: a parser library hands back decoded strings that would have to be encoded again, and would
split a multi-line event the relay must forward whole. This splitter only finds blank lines, in
``bytes``, and leaves the event's bytes alone.

Line endings: the SSE spec allows ``\\r\\n``, ``\\n`` and ``\\r``. Events are cut at ``\\n\\n``; an
upstream that writes ``\\r`` has its line endings normalised to ``\\n`` on the way through, which
any SSE client reads the same.
"""

from __future__ import annotations

__all__ = ["DONE", "EventSplitter", "event_data", "format_event", "lone_event"]

DONE = b"[DONE]"


class EventSplitter:
    """Cuts a byte stream into events. ``pending`` holds the bytes of an event not yet complete (what
    an upstream leaves when it stops mid-event); while it is empty, a read that is one whole event
    (:func:`lone_event`) needs no splitting."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events in ``chunk`` (with what was left of the previous one), each ending in
        ``\\n\\n``; an incomplete tail is kept for the next call."""
        buffer = self.pending + chunk if self.pending else chunk
        if buffer.find(b"\r") >= 0:  # find(): ``in`` on bytes costs twice as much (relay.py, _observe)
            buffer = _normalise(buffer)
        end = buffer.find(b"\n\n")
        if end < 0:
            self.pending = buffer
            return []
        if 0 < end == len(buffer) - 2:
            # One event, ending the read, as tokens come at a model's pace: handed back as it is.
            # Each call of a bytes method costs about 1,000 instructions; cutting it out of the
            # buffer would make four more.
            self.pending = b""
            return [buffer]
        # Cut from the left, as a reader of the whole stream would: however the reads split the
        # bytes, the same events come out.
        *events, self.pending = buffer.split(b"\n\n")
        return [event + b"\n\n" for event in events if event.strip(b"\n")]


def lone_event(chunk: bytes) -> bool:
    """Whether ``chunk`` is one whole event of a single ``data: `` line and nothing else, as a
    model's token arrives: its data is then ``chunk[6:-2]``. When the splitter has nothing pending,
    such a read is what :meth:`EventSplitter.feed` and :func:`event_data` would make of it, for half
    their cost."""
    return (
        chunk.find(b"\n") == len(chunk) - 2  # first: a read of several events fails it at once
        and chunk[-1] == 10  # the second newline
        and chunk.startswith(b"data: ")
        and chunk.find(b"\r") < 0  # a lone \r ends a line too
    )


def _normalise(buffer: bytes) -> bytes:
    # A trailing \r may be the first half of \r\n: keep it as is until the next chunk comes.
    tail = b"\r" if buffer.endswith(b"\r") else b""
    body = buffer[:-1] if tail else buffer
    return body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail


def event_data(event: bytes) -> bytes | None:
    """The ``data`` of one event (its ``data:`` lines joined by newlines), or None for an event without
    data (a comment used as keep-alive, say)."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2:
        return event[6:-2]
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def format_event(data: bytes, *, event_id: str | None = None) -> bytes:
    head = b"id: " + event_id.encode() + b"\n" if event_id is not None else b""
    return head + b"data: " + data + b"\n\n"
