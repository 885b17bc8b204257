from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import EventSplitter, event_data, format_event, lone_event


def test_events_cut_at_blank_lines_and_tail_kept() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2\n") == [b"data: 1\n\n"]
    assert splitter.pending == b"data: 2\n"
    assert splitter.feed(b"\n") == [b"data: 2\n\n"]
    assert splitter.pending == b""


def test_multi_line_event_kept_whole() -> None:
    event = b"event: response.output_text.delta\nid: 3\ndata: {}\n\n"
    assert EventSplitter().feed(event) == [event]


def test_crlf_line_endings_normalised_across_chunks() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\n\r") == []
    # The last \r may be half of a \r\n, so that event waits for the next byte.
    assert splitter.feed(b"\ndata: b\r\r") == [b"data: a\n\n"]
    assert splitter.feed(b"data: c\n\n") == [b"data: b\n\n", b"data: c\n\n"]


def test_event_data() -> None:
    assert event_data(b"data: {}\n\n") == b"{}"
    assert event_data(b"data:{}\n\n") == b"{}"
    assert event_data(b"event: x\ndata: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b": keep-alive\n\n") is None


def test_format_event() -> None:
    assert format_event(b"{}") == b"data: {}\n\n"
    assert format_event(b"{}", event_id="c/1") == b"id: c/1\ndata: {}\n\n"


events = st.lists(
    st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"") or b"x"),
    min_size=1,
    max_size=20,
)


@given(events, st.data())
def test_any_chunking_yields_the_same_events(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    splitter = EventSplitter()
    out = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert out == [b"data: " + p + b"\n\n" for p in payloads]
    assert b"".join(out) == stream


@given(st.lists(st.sampled_from([b"data: x", b"a", b":", b"\n", b"\r", b"\n\n", b"\r\n"]), max_size=40), st.data())
def test_any_bytes_in_any_chunking_split_as_the_whole_stream_does(parts: list[bytes], data: st.DataObject) -> None:
    # Blank-line-only events, carriage returns and several events a read, cut anywhere: single-event
    # reads take a shorter path than the rest.
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert events == EventSplitter().feed(stream)
    assert all(event.endswith(b"\n\n") and event.strip(b"\n") and b"\r" not in event for event in events)


def test_a_read_of_one_event_is_that_event() -> None:
    splitter = EventSplitter()
    event = b'data: {"a":1}\ndata: 2\n\n'
    assert splitter.feed(event) == [event]
    assert splitter.feed(b"\n\n") == []  # blank lines alone make no event
    assert splitter.feed(b"\ndata: 3\n\n") == [b"\ndata: 3\n\n"]


def test_lone_event_is_one_single_line_data_event() -> None:
    assert lone_event(b'data: {"a":1}\n\n')
    assert lone_event(b"data: [DONE]\n\n")
    assert not lone_event(b"data: 1\n\ndata: 2\n\n")  # two events
    assert not lone_event(b"data: a\ndata: b\n\n")  # two data lines
    assert not lone_event(b"data: a\rdata: b\n\n")  # a lone \r ends a line too
    assert not lone_event(b"data: a\r\n\r\n")
    assert not lone_event(b"data: a\n")  # not complete
    assert not lone_event(b"data:a\n\n")  # read by event_data, but not this short path
    assert not lone_event(b"event: x\ndata: y\n\n")
    assert not lone_event(b": keep-alive\n\n")


@given(
    st.lists(st.sampled_from([b"data: ", b"data:", b"x", b":", b"\n", b"\r", b"\n\n", b"[DONE]"]), max_size=8),
    st.booleans(),
)
def test_lone_event_splits_and_reads_as_the_splitter_does(parts: list[bytes], framed: bool) -> None:
    # Framed as an event half the time, so that both answers come up often.
    chunk = b"data: " + b"".join(parts) + b"\n\n" if framed else b"".join(parts)
    if lone_event(chunk):
        assert EventSplitter().feed(chunk) == [chunk]
        assert event_data(chunk) == chunk[6:-2]
