from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.guard import RepetitionGuard


def feed_all(guard: RepetitionGuard, pieces: list[str]) -> bool:
    return any(guard.feed(piece) for piece in pieces)


def test_a_word_loop_is_caught() -> None:
    assert feed_all(RepetitionGuard(1, 5), ["the", " the", " the", " the", " the", " the "])


def test_a_sentence_loop_is_caught_across_chunk_boundaries() -> None:
    text = "I am a model. " * 6
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert feed_all(RepetitionGuard(4, 5), pieces)


def test_ordinary_text_passes() -> None:
    text = " ".join(f"word{i}" for i in range(500))
    assert not feed_all(RepetitionGuard(2, 4), [text[i : i + 7] for i in range(0, len(text), 7)])


def test_fewer_repeats_than_the_threshold_pass() -> None:
    assert not feed_all(RepetitionGuard(1, 5), ["yes " * 4, "no"])


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=200), st.integers(1, 4), st.integers(2, 6))
def test_verdict_does_not_depend_on_chunking(words: list[str], n: int, repeats: int) -> None:
    text = " ".join(words) + " "
    whole = RepetitionGuard(n, repeats).feed(text)
    chunked = RepetitionGuard(n, repeats)
    verdicts = [chunked.feed(text[i : i + 3]) for i in range(0, len(text), 3)]
    # Chunked, the loop is seen as soon as it exists; whole, only if it is at the very end.
    assert any(verdicts) or not whole
