"""The repeated n-gram guard: a stream whose text has fallen into a loop ("the the the ...", or a
sentence over and over) is stopped instead of burning tokens until ``max_tokens``.

It watches whole words of the first choice's content. The reply is degenerate when its last
``n * repeats`` words are one n-gram ``repeats`` times in a row.
"""

from __future__ import annotations

__all__ = ["RepetitionGuard"]


class RepetitionGuard:
    __slots__ = ("_n", "_partial", "_repeats", "_words")

    def __init__(self, n: int, repeats: int) -> None:
        self._n = n
        self._repeats = repeats
        self._words: list[str] = []
        self._partial = ""

    def feed(self, text: str) -> bool:
        """Add streamed text; True when the reply has become degenerate."""
        text = self._partial + text
        words = text.split()
        if text and not text[-1].isspace() and words:
            self._partial = words.pop()  # still being written
        else:
            self._partial = ""
        if not words:
            return False
        window = self._n * self._repeats
        self._words.extend(words)
        if len(self._words) > 2 * window:
            del self._words[:-window]
        if len(self._words) < window:
            return False
        tail = self._words[-window:]
        gram = tail[: self._n]
        return all(word == gram[i % self._n] for i, word in enumerate(tail))
