"""Token counts the gateway estimates itself, offline.

tiktoken downloads its tables on first use, which a gateway without internet cannot; and the
upstream's ``usage`` is the real count anyway. An estimate only has to be in the right range: about
four characters a token for English, plus the few tokens each chat message costs for its role.
"""

from __future__ import annotations

from typing import Any

__all__ = ["estimate_messages", "estimate_text", "message_text"]

_PER_MESSAGE = 4


def estimate_text(text: str) -> int:
    return (len(text) + 3) // 4


def estimate_messages(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        total += _PER_MESSAGE
        if isinstance(message, dict):
            total += estimate_text(message_text(message))
    return total


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message: ``content`` as a string, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
