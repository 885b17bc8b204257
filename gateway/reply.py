"""What the gateway learns of a reply while relaying it: the assistant message rebuilt from streamed
deltas (content, reasoning, tool calls), the finish reason, the usage. History records it and limits
charge it; the client receives the upstream's bytes, never this.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.wire import Chunk, ChunkHead, Completion, CompletionHead, Usage

__all__ = ["Reply"]


class _Choice:
    __slots__ = ("content", "finish_reason", "reasoning", "refusal", "role", "tool_calls")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        # index -> {"id", "type", "function": {"name", "arguments"}}; arguments arrive in pieces.
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content) if self.content else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    **call,
                    "function": {"name": call["function"]["name"], "arguments": "".join(call["function"]["arguments"])},
                }
                for _, call in sorted(self.tool_calls.items())
            ]
        return message


class Reply:
    __slots__ = (
        "_choices",
        "backend",
        "created",
        "done",
        "error",
        "first_token",
        "gaps",
        "id",
        "keep_message",
        "model",
        "retries",
        "started",
        "upstream_time",
        "usage",
    )

    def __init__(self) -> None:
        # How the reply came about, for logs and metrics; the relay fills these in.
        self.started = time.monotonic()
        self.backend: str | None = None
        """The backend that answered (the last one tried)."""
        self.retries = 0
        """Attempts beyond the first: retries on the same backend and failovers to others."""
        self.first_token: float | None = None
        """Seconds from ``started`` to the first event forwarded (or the whole body, non-streamed)."""
        self.gaps: list[float] = []
        """Seconds between consecutive forwarded stream chunks."""
        self.upstream_time = 0.0
        """Seconds spent waiting on the upstream (send to last byte): the rest is the gateway's own."""
        self.keep_message = True
        """Whether the message itself is wanted (history records it, or the access log shows it).
        When not, a stream's chunks are read only for what the gateway needs from them: the id, the
        usage, an in-band error; and a non-streamed answer's choices are not decoded."""
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.usage: Usage | None = None
        self.done = False
        """The upstream said the reply is complete (``[DONE]``, or a whole non-streamed body)."""
        self.error: str | None = None
        """Why the reply ended early, when it did (an OpenAI error code)."""
        self._choices: dict[int, _Choice] = {}

    def observe_chunk(self, chunk: ChunkHead) -> None:
        """A stream's event: its choices' deltas too when it is a whole :class:`Chunk`."""
        if self.id is None:
            self.id, self.model, self.created = chunk.id, chunk.model, chunk.created
        if chunk.usage is not None:
            self.usage = chunk.usage
        if not isinstance(chunk, Chunk) or not chunk.choices:
            return
        for choice in chunk.choices:
            state = self._choices.get(choice.index)
            if state is None:
                state = self._choices[choice.index] = _Choice()
            if choice.finish_reason is not None:
                state.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.role:
                state.role = delta.role
            if delta.content:
                state.content.append(delta.content)
            if delta.reasoning_content:
                state.reasoning.append(delta.reasoning_content)
            if delta.refusal:
                state.refusal.append(delta.refusal)
            for call in delta.tool_calls or ():
                index = call.index if call.index is not None else len(state.tool_calls)
                slot = state.tool_calls.get(index)
                if slot is None:
                    slot = state.tool_calls[index] = {
                        "id": None,
                        "type": "function",
                        "function": {"name": None, "arguments": []},
                    }
                if call.id:
                    slot["id"] = call.id
                if call.type:
                    slot["type"] = call.type
                if call.function is not None:
                    if call.function.name:
                        slot["function"]["name"] = call.function.name
                    if call.function.arguments:
                        slot["function"]["arguments"].append(call.function.arguments)

    def observe_completion(self, completion: CompletionHead) -> None:
        """A non-streamed answer: its message too when it is a whole :class:`Completion`."""
        self.id, self.model, self.created, self.usage = (
            completion.id,
            completion.model,
            completion.created,
            completion.usage,
        )
        self.done = True
        if not isinstance(completion, Completion):
            return
        for choice in completion.choices or ():
            state = self._choices[choice.index] = _Choice()
            state.finish_reason = choice.finish_reason
            message = choice.message
            if message is None:
                continue
            state.role = message.role or "assistant"
            if message.content:
                state.content.append(message.content)
            if message.reasoning_content:
                state.reasoning.append(message.reasoning_content)
            if message.refusal:
                state.refusal.append(message.refusal)
            for i, raw in enumerate(message.tool_calls or ()):
                call = msgspec.json.decode(raw)
                if isinstance(call, dict):
                    function = call.get("function") or {}
                    state.tool_calls[i] = {
                        "id": call.get("id"),
                        "type": call.get("type", "function"),
                        "function": {"name": function.get("name"), "arguments": [function.get("arguments") or ""]},
                    }

    def choices(self, unfinished: str) -> list[dict[str, Any]]:
        """The reply's ``choices`` as OpenAI's ``chat.completion`` writes them (one, empty, when
        nothing came); ``unfinished`` is the finish reason of a choice that never got one."""
        if not self._choices:
            return [{"index": 0, "message": self.message(), "logprobs": None, "finish_reason": unfinished}]
        # Most replies have one choice: nothing to sort.
        ordered = self._choices.items() if len(self._choices) == 1 else sorted(self._choices.items())
        return [
            {
                "index": i,
                "message": choice.message(),
                "logprobs": None,
                "finish_reason": choice.finish_reason or unfinished,
            }
            for i, choice in ordered
        ]

    def message(self) -> dict[str, Any]:
        """The first choice's message: what a conversation keeps and a body log shows."""
        choice = self._choices.get(0)
        return choice.message() if choice else {"role": "assistant", "content": None}

    def text(self) -> str:
        """The first choice's content so far."""
        choice = self._choices.get(0)
        return "".join(choice.content) if choice else ""
