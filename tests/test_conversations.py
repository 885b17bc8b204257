from __future__ import annotations

from gateway.conversations import items_to_messages, merge, messages_to_items, new_turn, normalise_items, window

SYSTEM = {"role": "system", "content": "Be brief."}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}
TURN = [
    SYSTEM,
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "assistant", "content": "a1"},
]


def test_messages_round_trip_through_items() -> None:
    items = messages_to_items(TURN)
    assert [i["type"] for i in items] == ["message", "message", "function_call", "function_call_output", "message"]
    assert items[1]["content"] == [{"type": "input_text", "text": "q1"}]
    assert items[4]["content"] == [{"type": "output_text", "text": "a1", "annotations": []}]
    assert len({i["id"] for i in items}) == len(items)
    assert items_to_messages(items) == TURN


def test_assistant_text_and_calls_stay_one_message() -> None:
    message = {"role": "assistant", "content": "checking", "tool_calls": [CALL]}
    assert items_to_messages(messages_to_items([message])) == [message]


def test_images_survive() -> None:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
        ],
    }
    assert items_to_messages(messages_to_items([message])) == [message]


def test_window_keeps_system_and_newest() -> None:
    items = messages_to_items([SYSTEM, *[{"role": "user", "content": f"m{i}"} for i in range(10)]])
    assert window(items, max_messages=3, max_tokens=0) == [SYSTEM] + [
        {"role": "user", "content": f"m{i}"} for i in (7, 8, 9)
    ]


def test_window_by_tokens() -> None:
    items = messages_to_items([{"role": "user", "content": "x" * 400} for _ in range(5)])  # ~104 tokens each
    assert len(window(items, max_messages=0, max_tokens=250)) == 2


def test_window_never_starts_with_an_orphan_tool_result() -> None:
    items = messages_to_items(TURN)
    assert window(items, max_messages=2, max_tokens=0) == [SYSTEM, {"role": "assistant", "content": "a1"}]


def test_merge_puts_system_first_once() -> None:
    history = [SYSTEM, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    request = [SYSTEM, {"role": "user", "content": "q2"}]
    assert merge(history, request) == [*history, {"role": "user", "content": "q2"}]


def test_new_turn_does_not_store_a_known_system_prompt_again() -> None:
    stored = messages_to_items([SYSTEM, {"role": "user", "content": "q1"}])
    request = [SYSTEM, {"role": "user", "content": "q2"}]
    assert new_turn(stored, request) == [{"role": "user", "content": "q2"}]
    assert new_turn([], request) == request


def test_items_from_clients_are_normalised() -> None:
    (item,) = normalise_items([{"type": "message", "role": "user", "content": "hello"}])
    assert item["id"].startswith("msg_") and item["content"] == [{"type": "input_text", "text": "hello"}]
    (kept,) = normalise_items([{"type": "message", "id": "msg_given", "role": "assistant", "content": "x"}])
    assert kept["id"] == "msg_given" and kept["content"][0]["type"] == "output_text"
