"""Usage per key, per model, per day (UTC): requests, prompt and completion tokens.

Redis: one hash a day, ``gw:usage:{day}``, fields ``{key_id}|{model}|{measure}`` counted with
HINCRBY, and ``gw:usage:names`` mapping key ids to names; kept for ``[history] ttl_days``.

Each process adds up its counts in memory and flushes them once a second in one pipeline: a Redis
round trip per request cost about 100 us of CPU for what is reporting, not billing. Counts that
cannot be flushed (Redis down) are kept and flushed later; a process that dies loses at most its
last second.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import Any, Protocol

from redis.exceptions import RedisError

__all__ = ["MemoryUsage", "RedisUsage", "UsageBook", "day_of"]

log = logging.getLogger("gateway.usage")

_MEASURES = ("requests", "prompt_tokens", "completion_tokens")


def day_of(timestamp: float) -> str:
    """The UTC day of ``timestamp``, as ``YYYY-MM-DD``."""
    return _day_of_second(int(timestamp))


@functools.lru_cache(maxsize=4)
def _day_of_second(second: int) -> str:
    # Every request asks; strftime is the costliest step of counting one.
    return time.strftime("%Y-%m-%d", time.gmtime(second))


class UsageBook(Protocol):
    def add(self, key_id: str, key_name: str, model: str, prompt: int, completion: int) -> None:
        """Count one request: in memory, never waiting (the Redis book flushes in the background)."""

    async def rows(self, *, key_id: str | None = None, day: str | None = None) -> list[dict[str, Any]]: ...


def _rows(
    counts: dict[tuple[str, str, str], dict[str, int]], names: dict[str, str], key_id: str | None, day: str | None
) -> list[dict[str, Any]]:
    rows = []
    for (row_day, row_key, model), measures in sorted(counts.items()):
        if (key_id is None or row_key == key_id) and (day is None or row_day == day):
            rows.append(
                {
                    "key_id": row_key,
                    "key_name": names.get(row_key, row_key),
                    "model": model,
                    "day": row_day,
                    **{m: measures.get(m, 0) for m in _MEASURES},
                }
            )
    return rows


class MemoryUsage:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], dict[str, int]] = collections.defaultdict(dict)
        self._names: dict[str, str] = {}

    def add(self, key_id: str, key_name: str, model: str, prompt: int, completion: int) -> None:
        row = self._counts[(day_of(time.time()), key_id, model)]
        for measure, value in zip(_MEASURES, (1, prompt, completion), strict=True):
            row[measure] = row.get(measure, 0) + value
        self._names[key_id] = key_name

    async def rows(self, *, key_id: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        return _rows(self._counts, self._names, key_id, day)


class RedisUsage:
    def __init__(
        self, redis: Any, *, ttl_seconds: float | None, prefix: str = "gw:usage", interval: float = 1.0
    ) -> None:
        self._redis = redis
        self._ttl = int(ttl_seconds) if ttl_seconds else None
        self._prefix = prefix
        self._interval = interval
        self._pending: dict[tuple[str, str, str], list[int]] = {}
        """Counts not flushed yet: requests, prompt and completion tokens (``_MEASURES``), by day,
        key and model."""
        self._names: dict[str, str] = {}

    def add(self, key_id: str, key_name: str, model: str, prompt: int, completion: int) -> None:
        row = (day_of(time.time()), key_id, model)
        counts = self._pending.get(row)
        if counts is None:
            self._pending[row] = [1, prompt, completion]
        else:
            counts[0] += 1
            counts[1] += prompt
            counts[2] += completion
        self._names[key_id] = key_name

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, names = self._pending, self._names
        self._pending, self._names = {}, {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for (day, key_id, model), counts in pending.items():
                    for measure, value in zip(_MEASURES, counts, strict=True):
                        pipe.hincrby(f"{self._prefix}:{day}", f"{key_id}|{model}|{measure}", value)
                for day in {day for day, *_ in pending}:
                    pipe.sadd(f"{self._prefix}:days", day)
                    if self._ttl:
                        pipe.expire(f"{self._prefix}:{day}", self._ttl)
                pipe.hset(f"{self._prefix}:names", mapping=names)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("usage counts kept for later, Redis failed: %s", exc)
            for row, counts in pending.items():
                kept = self._pending.setdefault(row, [0, 0, 0])
                for i, value in enumerate(counts):
                    kept[i] += value
            self._names = names | self._names

    async def run(self) -> None:
        """The flush loop the app's lifespan runs."""
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def rows(self, *, key_id: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        await self.flush()  # this replica's latest counts, at least
        days = [day] if day else sorted(_text(d) for d in await self._redis.smembers(f"{self._prefix}:days"))
        counts: dict[tuple[str, str, str], dict[str, int]] = collections.defaultdict(dict)
        for row_day in days:
            for field, value in (await self._redis.hgetall(f"{self._prefix}:{row_day}")).items():
                row_key, model, measure = _text(field).rsplit("|", 2)
                counts[(row_day, row_key, model)][measure] = int(value)
        names = {_text(k): _text(v) for k, v in (await self._redis.hgetall(f"{self._prefix}:names")).items()}
        return _rows(counts, names, key_id, day)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
