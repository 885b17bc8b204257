"""Usage counts: added up in memory, flushed to a real Redis, kept while Redis is down."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from gateway.usage import MemoryUsage, RedisUsage, day_of
from tests.conftest import RedisServer, SharedRedis


@pytest.fixture
async def client(redis_server: RedisServer | SharedRedis) -> AsyncIterator[redis.asyncio.Redis]:
    redis_client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=1)
    yield redis_client
    await redis_client.aclose()


async def _add_some(book: MemoryUsage | RedisUsage) -> None:
    book.add("k1", "alpha", "m1", 10, 5)
    book.add("k1", "alpha", "m1", 3, 2)
    book.add("k1", "alpha", "m2", 1, 1)
    book.add("k2", "beta", "m1", 7, 0)


def _counts(rows: list[dict[str, object]]) -> dict[tuple[object, object], tuple[object, ...]]:
    measures = ("key_name", "requests", "prompt_tokens", "completion_tokens")
    return {(row["key_id"], row["model"]): tuple(row[name] for name in measures) for row in rows}


EXPECTED = {
    ("k1", "m1"): ("alpha", 2, 13, 7),
    ("k1", "m2"): ("alpha", 1, 1, 1),
    ("k2", "m1"): ("beta", 1, 7, 0),
}


async def test_redis_counts_match_memory_counts(client: redis.asyncio.Redis) -> None:
    memory, shared = MemoryUsage(), RedisUsage(client, ttl_seconds=3600)
    for book in (memory, shared):
        await _add_some(book)
    assert _counts(await memory.rows()) == EXPECTED
    await shared.flush()
    assert _counts(await shared.rows()) == EXPECTED
    today = day_of(time.time())
    assert _counts(await shared.rows(key_id="k2", day=today)) == {("k2", "m1"): EXPECTED[("k2", "m1")]}
    # A second replica's counts add to the first's.
    other = RedisUsage(client, ttl_seconds=3600)
    other.add("k1", "alpha", "m2", 4, 4)
    await other.flush()
    assert _counts(await shared.rows())[("k1", "m2")] == ("alpha", 2, 5, 5)


async def test_counts_survive_redis_down(
    redis_server: RedisServer | SharedRedis, client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    book = RedisUsage(client, ttl_seconds=3600)
    book.add("k1", "alpha", "m1", 10, 5)
    redis_server.stop()
    try:
        await _add_some(book)
        await book.flush()  # fails: the counts stay for the next flush
        assert "usage counts kept for later" in caplog.text
        book.add("k1", "alpha", "m1", 1, 1)
    finally:
        redis_server.start()
    await book.flush()
    expected = dict(EXPECTED)
    expected[("k1", "m1")] = ("alpha", 4, 24, 13)
    assert _counts(await book.rows()) == expected
