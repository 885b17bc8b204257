"""The OpenAI wire format, as far as the gateway needs to read or write it.

Requests are decoded into these Structs only to route them; the original bytes are what the upstream
receives. msgspec skips fields a Struct does not declare, so re-encoding a decoded request would drop
whatever the client sent that is not listed here (vLLM's ``top_k``, ``guided_json``, ...): never do that.
Rewrites go through :func:`rewrite_fields`, which keeps every other top-level field as its original bytes.

This module imports nothing else from the gateway.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "REMOVE",
    "ChatRequest",
    "Chunk",
    "ChunkChoice",
    "ChunkHead",
    "Completion",
    "CompletionHead",
    "Delta",
    "ErrorBody",
    "ErrorDetail",
    "LegacyChat",
    "Message",
    "MetadataUpdate",
    "ModelCard",
    "ModelList",
    "NewConversation",
    "NewItems",
    "RoutedRequest",
    "ToolCallDelta",
    "Usage",
    "decode_chat",
    "decode_chunk",
    "decode_completion",
    "decode_routed",
    "encode",
    "rewrite_fields",
]


class Wire(msgspec.Struct, omit_defaults=True):
    """Base of the Structs the gateway reads.

    ``omit_defaults``: were one encoded, absent optional fields stay absent rather than ``null``.
    Structs the gateway writes (models, errors) spell every field out, as OpenAI does. Unknown fields
    are ignored on decode (msgspec's default), which is what a proxy reading a subset of an evolving
    API needs; ``forbid_unknown_fields`` belongs on the config Structs only.
    """


class RoutedRequest(Wire):
    """The fields of any model-serving request the gateway routes on (chat, completions, embeddings,
    responses). ``model`` is typed loosely so a wrong type gets our own 400, not a decoder message."""

    model: Any = None
    stream: bool | None = None
    max_tokens: int | None = None
    max_output_tokens: int | None = None


class ChatRequest(Wire):
    """What the gateway reads of ``POST /v1/chat/completions``.

    ``messages`` stays raw: the gateway forwards it, and only history needs it decoded. (msgspec takes
    no ``Raw | None``; an empty ``Raw`` means the field was absent.)
    """

    model: Any = None
    messages: msgspec.Raw = msgspec.Raw()
    stream: bool | None = None
    # A dict, not a Struct: when the gateway adds include_usage, the client's other options stay.
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    conversation: Any = None
    background: bool | None = None


class Usage(Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class FunctionDelta(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Wire):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(Wire):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Wire):
    index: int = 0
    delta: Delta | None = None
    finish_reason: str | None = None


class ChunkHead(Wire):
    """What the relay reads of a ``chat.completion.chunk`` when nothing wants its choices (no history,
    no body logs, no repetition guard): decoding them too takes twice as long. ``error`` is set when
    an upstream reports a failure in-band (vLLM and OpenAI do, mid-stream)."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    usage: Usage | None = None
    error: msgspec.Raw = msgspec.Raw()


class Chunk(ChunkHead):
    """One ``chat.completion.chunk`` event, as the relay observes it."""

    choices: list[ChunkChoice] | None = None


class Message(Wire):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[msgspec.Raw] | None = None


class CompletionChoice(Wire):
    index: int = 0
    message: Message | None = None
    finish_reason: str | None = None


class CompletionHead(Wire):
    """What the gateway reads of a non-streamed ``chat.completion`` whose message nobody keeps (no
    history, no body logs): decoding the choices as well takes twice as long."""

    id: str | None = None
    model: str | None = None
    created: int | None = None
    usage: Usage | None = None


class Completion(CompletionHead):
    """A non-streamed ``chat.completion``, as the gateway observes it."""

    choices: list[CompletionChoice] | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class MetadataUpdate(Wire):
    """``POST /v1/chat/completions/{id}`` and ``POST /v1/conversations/{id}``."""

    metadata: dict[str, str] | None = None


class NewConversation(Wire):
    items: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None


class NewItems(Wire):
    items: list[dict[str, Any]]


class LegacyChat(Wire):
    """``POST /chat``, the route of the service this gateway replaces."""

    user_id: str
    message: str
    model: str | None = None


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object. ``param`` and ``code`` are always present, ``null`` when unset, as
    OpenAI sends them."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_routed_decoder = msgspec.json.Decoder(RoutedRequest)
_chunk_decoder = msgspec.json.Decoder(Chunk)
_chunk_head_decoder = msgspec.json.Decoder(ChunkHead)
_completion_decoder = msgspec.json.Decoder(Completion)
_completion_head_decoder = msgspec.json.Decoder(CompletionHead)
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()

encode = _encoder.encode


def decode_chat(body: bytes) -> ChatRequest:
    return _chat_decoder.decode(body)


def decode_routed(body: bytes) -> RoutedRequest:
    return _routed_decoder.decode(body)


def decode_chunk(data: bytes, *, choices: bool = True) -> ChunkHead:
    """A :class:`Chunk`; without ``choices``, only its :class:`ChunkHead`."""
    return (_chunk_decoder if choices else _chunk_head_decoder).decode(data)


def decode_completion(body: bytes, *, choices: bool = True) -> CompletionHead:
    """A :class:`Completion`; without ``choices``, only its :class:`CompletionHead`."""
    return (_completion_decoder if choices else _completion_head_decoder).decode(body)


def rewrite_fields(body: bytes, changes: dict[str, Any]) -> bytes:
    """Return ``body`` with top-level fields replaced, added, or removed (value :data:`REMOVE`).

    Every field not named in ``changes`` keeps its original bytes: the body is split into raw
    top-level values and put back together, so numbers, key order and unknown fields survive exactly.
    """
    fields = _fields_decoder.decode(body)
    for key, value in changes.items():
        if value is REMOVE:
            fields.pop(key, None)
        else:
            fields[key] = msgspec.Raw(_encoder.encode(value))
    return _encoder.encode(fields)


class _Remove:
    def __repr__(self) -> str:
        return "REMOVE"


REMOVE: Any = _Remove()
