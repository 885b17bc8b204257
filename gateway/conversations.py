"""Server-side memory: a conversation's items turned into the chat messages that precede a request,
and a finished turn turned back into items.

Items follow OpenAI's Conversations API: ``message`` items (``input_text`` / ``output_text`` parts),
``function_call`` items for an assistant's tool calls and ``function_call_output`` items for the
``tool`` messages that answer them. The window sent upstream keeps every system message (first, once
each) and the newest other items up to ``max_messages`` and about ``max_tokens``, never starting
with a tool result whose call was cut off (an upstream rejects such a history).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from gateway.stores.base import Item
from gateway.tokens import estimate_text

__all__ = [
    "items_to_messages",
    "merge",
    "messages_to_items",
    "new_id",
    "new_turn",
    "normalise_items",
    "window",
]

_SYSTEM_ROLES = frozenset({"system", "developer"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def messages_to_items(messages: Iterable[dict[str, Any]]) -> list[Item]:
    items: list[Item] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "id": new_id("fco"),
                    "call_id": message.get("tool_call_id"),
                    "output": _text(message.get("content")),
                    "status": "completed",
                }
            )
            continue
        content = message.get("content")
        if (content is not None and content != "") or not message.get("tool_calls"):
            items.append(
                {
                    "type": "message",
                    "id": new_id("msg"),
                    "status": "completed",
                    "role": role,
                    "content": _parts(content, output=role == "assistant"),
                }
            )
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "id": new_id("fc"),
                    "call_id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments") or "",
                    "status": "completed",
                }
            )
    return items


def normalise_items(items: Iterable[dict[str, Any]]) -> list[Item]:
    """Items as a client sends them to ``POST /conversations`` (``content`` may be a plain string, ids
    are usually absent) in the stored shape."""
    out: list[Item] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            out.append(
                {
                    "type": "message",
                    "id": item.get("id") or new_id("msg"),
                    "status": "completed",
                    "role": role,
                    "content": _parts(item.get("content"), output=role == "assistant"),
                }
            )
        else:
            prefix = "fc" if kind == "function_call" else "fco" if kind == "function_call_output" else "item"
            out.append({**item, "type": kind, "id": item.get("id") or new_id(prefix)})
    return out


def items_to_messages(items: Iterable[Item]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _chat_content(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            # A turn's calls follow its assistant message item: they belong to that message.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output", "")})
    return messages


def window(items: list[Item], *, max_messages: int, max_tokens: int) -> list[dict[str, Any]]:
    """The chat messages a conversation contributes to a request: system messages first, then the
    newest others that fit."""
    messages = items_to_messages(items)
    system = [m for m in messages if m["role"] in _SYSTEM_ROLES]
    rest = [m for m in messages if m["role"] not in _SYSTEM_ROLES]
    if max_messages:
        rest = rest[-max_messages:]
    if max_tokens:
        budget = max_tokens - sum(_estimate(m) for m in system)
        kept: list[dict[str, Any]] = []
        for message in reversed(rest):
            budget -= _estimate(message)
            if budget < 0:
                break
            kept.append(message)
        rest = kept[::-1]
    while rest and rest[0]["role"] == "tool":
        rest = rest[1:]
    return system + rest


def merge(history: list[dict[str, Any]], request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages sent upstream: every system message once, in order of first appearance, then the
    conversation, then the request's own turn."""
    system: list[dict[str, Any]] = []
    for message in (*history, *request):
        if message.get("role") in _SYSTEM_ROLES and message not in system:
            system.append(message)
    return (
        system
        + [m for m in history if m.get("role") not in _SYSTEM_ROLES]
        + [m for m in request if m.get("role") not in _SYSTEM_ROLES]
    )


def new_turn(history: list[Item], request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages worth appending: a system message the conversation already holds is
    not stored again each turn."""
    stored_system = [m for m in items_to_messages(history) if m["role"] in _SYSTEM_ROLES]
    return [m for m in request if not (m.get("role") in _SYSTEM_ROLES and _as_chat(m) in stored_system)]


def _as_chat(message: dict[str, Any]) -> dict[str, Any]:
    return {"role": message.get("role"), "content": _chat_content(_parts(message.get("content"), output=False))}


def _parts(content: Any, *, output: bool) -> list[dict[str, Any]]:
    text_type = "output_text" if output else "input_text"
    if content is None:
        return []
    if isinstance(content, str):
        part: dict[str, Any] = {"type": text_type, "text": content}
        if output:
            part["annotations"] = []
        return [part]
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            converted: dict[str, Any] = {"type": text_type, "text": part.get("text", "")}
            if output:
                converted["annotations"] = []
            parts.append(converted)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append({"type": "input_image", "image_url": url, "detail": "auto"})
        else:
            parts.append(part)
    return parts


def _chat_content(parts: Any) -> Any:
    """Chat content from item parts: a plain string when it is only text, as most servers prefer."""
    if not isinstance(parts, list):
        return parts if isinstance(parts, str) else ""
    if all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in parts):
        return "".join(p.get("text", "") for p in parts)
    converted = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            converted.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            converted.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
    return converted


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _estimate(message: dict[str, Any]) -> int:
    return 4 + estimate_text(_text(message.get("content")))
