"""The first step of every request: its id, its body, and the few fields the gateway routes on.

Decoding errors become OpenAI's own 400s, worded the way OpenAI words them, with ``param`` naming the
field, so SDK users see what they would see from OpenAI.
"""

from __future__ import annotations

import random
import re
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.types import Receive, Scope

from gateway.errors import ClientGone, InvalidJSON, InvalidRequest, PayloadTooLarge
from gateway.wire import ChatRequest, RoutedRequest, decode_chat, decode_routed

__all__ = ["decode_body", "header", "parse_chat", "parse_routed", "read_body", "request_id"]

T = TypeVar("T")

# A client's id is echoed in a response header and written to logs: keep it to a harmless alphabet.
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")
_TYPE = re.compile(r"^Expected `([^`]*)`, got `([^`]*)` - at `\$\.?([^`]*)`$")


def request_id(scope: Scope | Request) -> str:
    """The request's id: the client's ``x-request-id`` when it sent a usable one, else a new one.
    Computed once per request and kept in the scope, so handlers, errors and logs agree."""
    if isinstance(scope, Request):
        scope = scope.scope
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id" and _VALID_ID.match(value):
                rid = value.decode()
                break
        else:
            # 128 random bits, as a uuid4's hex, for a fifth of its cost: an id needs to be unique,
            # not unguessable (the random module reseeds in each forked worker).
            rid = f"{random.getrandbits(128):032x}"
        state["request_id"] = rid
    return rid


def header(scope: Scope, name: bytes) -> str | None:
    """One request header (``name`` lowercase, as ASGI servers pass names), read from the scope:
    Litestar's ``request.headers`` decodes them all into a multidict first."""
    for header_name, value in scope["headers"]:
        if header_name == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request's body, refused with a 413 once it is over ``limit`` bytes (by its declared
    length before reading anything, else as it arrives)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge()
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body"):
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge()
        return body
    parts: list[bytes] = []
    size = 0
    while True:
        if message["type"] != "http.request":
            raise ClientGone()
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise PayloadTooLarge()
        parts.append(part)
        if not message.get("more_body"):
            return b"".join(parts)
        message = await receive()


def parse_chat(body: bytes) -> ChatRequest:
    chat = _decode(decode_chat, body)
    _check_model(chat.model)
    if not chat.messages:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    return chat


def parse_routed(body: bytes) -> RoutedRequest:
    routed = _decode(decode_routed, body)
    _check_model(routed.model)
    return routed


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode_body(kind: type[T], body: bytes) -> T:
    """Decode a small request body (history and admin endpoints) into ``kind``, with OpenAI's 400s."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return _decode(decoder.decode, body)


def _decode(decode: Any, body: bytes) -> Any:
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        if missing := _MISSING.match(str(exc)):
            raise InvalidRequest(
                f"Missing required parameter: '{missing.group(1)}'.",
                param=missing.group(1),
                code="missing_required_parameter",
            ) from None
        match = _TYPE.match(str(exc))
        if match is None:
            # "Expected `object`, got `array`": the body is JSON but not an object.
            raise InvalidRequest(f"Invalid request body: {exc}. The body must be a JSON object.") from None
        expected, got, param = match.groups()
        raise InvalidRequest(
            f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
            param=param,
            code="invalid_type",
        ) from None
    except msgspec.DecodeError:
        raise InvalidJSON(
            "We could not parse the JSON body of your request. The API expects a JSON payload, "
            "but what was sent was not valid JSON."
        ) from None


def _check_model(model: object) -> None:
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            f"Invalid type for 'model': expected a non-empty string, but got {type(model).__name__} instead.",
            param="model",
            code="invalid_type",
        )
