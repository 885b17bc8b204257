"""Rate-limit arithmetic (property tests), and both limiters held to one contract on a real Redis."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gateway.limits
from gateway.errors import RateLimited, ServiceUnavailable
from gateway.limits import (
    Admission,
    Limits,
    MemoryLimiter,
    RedisLimiter,
    State,
    gcra,
    remaining,
    reset_text,
    retry_after,
)
from tests.conftest import RedisServer, free_port

WINDOW = 60.0


@given(limit=st.integers(1, 500), arrivals=st.lists(st.floats(0, 300, allow_nan=False), max_size=400))
def test_burst_then_steady_rate(limit: int, arrivals: list[float]) -> None:
    """GCRA's guarantee, whatever the arrival pattern: over any span of S seconds at most a burst of
    the limit plus S / (W / limit) more are admitted. So the long-run rate is the limit per window,
    and one window sees at most 2 * limit - 1 (a strict sliding window would cap it at the limit)."""
    tat, admitted = 0.0, []
    for now in sorted(arrivals):
        ok, tat = gcra(tat, now, 1, limit, WINDOW)
        if ok:
            admitted.append(now)
    interval = WINDOW / limit
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            assert j - i + 1 <= limit + (admitted[j] - start) / interval + 1e-6
        assert len([t for t in admitted if start <= t < start + WINDOW]) <= 2 * limit - 1


@given(limit=st.integers(1, 1000), burst=st.integers(1, 2000))
def test_a_burst_admits_exactly_the_limit(limit: int, burst: int) -> None:
    tat, admitted = 0.0, 0
    for _ in range(burst):
        ok, tat = gcra(tat, 100.0, 1, limit, WINDOW)
        admitted += ok
    assert admitted == min(limit, burst)


@given(limit=st.integers(1, 10_000), cost=st.integers(1, 10_000), used=st.floats(0, WINDOW, allow_nan=False))
def test_retry_after_is_exactly_when_it_fits(limit: int, cost: int, used: float) -> None:
    now = 1000.0
    tat = now + used
    wait = retry_after(tat, now, cost, limit, WINDOW)
    if cost > limit:
        assert math.isinf(wait)
        return
    assert gcra(tat, now + wait + 1e-6, cost, limit, WINDOW)[0]
    if wait > 1e-3:
        assert not gcra(tat, now + wait - 1e-3, cost, limit, WINDOW)[0]


@given(limit=st.integers(1, 1000), taken=st.integers(0, 1000))
def test_remaining_counts_down_from_the_limit(limit: int, taken: int) -> None:
    tat = 0.0
    for _ in range(taken):
        tat = gcra(tat, 0.0, 1, limit, WINDOW)[1]
    assert remaining(tat, 0.0, limit, WINDOW) == max(0, limit - taken)


def test_unlimited_is_unlimited() -> None:
    assert gcra(5.0, 0.0, 10**9, 0, WINDOW) == (True, 5.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (1, "1s"), (59.25, "59.2s"), (360, "6m0s"), (61.5, "1m1.5s"), (3.05, "3s"), (125.04, "2m5s")],
)
def test_reset_written_like_openai(seconds: float, text: str) -> None:
    assert reset_text(seconds) == text


_LUA_HEADER_VALUES = (
    gateway.limits._HEADER_VALUES
    + "return {remaining(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])),"
    + " reset(tonumber(ARGV[1]) - tonumber(ARGV[2]))}"
)


@settings(max_examples=400, deadline=None)
@given(
    used=st.floats(-10, 7200, allow_nan=False),
    limit=st.integers(1, 10**12),
    window=st.sampled_from([1.0, 60.0, 86400.0]) | st.floats(0.5, 86400),
)
@example(used=0.9995, limit=60, window=60.0)
@example(used=59.96, limit=60, window=60.0)
@example(used=119.95, limit=1000, window=3600.0)
@example(used=0.0, limit=10**12, window=60.0)
def test_redis_writes_the_headers_python_writes(
    redis_module: RedisServer, used: float, limit: int, window: float
) -> None:
    """The Redis limiter's headers come from its Lua, the memory limiter's from Python: the same
    text for any state."""
    now = 1_763_000_000.123456
    tat = now + used
    client = redis.Redis.from_url(redis_module.url)
    try:
        count, reset = client.eval(_LUA_HEADER_VALUES, 0, repr(tat), repr(now), limit, repr(window))
    finally:
        client.close()
    assert count.decode() == str(remaining(tat, now, limit, window))
    assert reset.decode() == reset_text(max(tat - now, 0.0))


async def test_both_limiters_send_the_same_headers(redis_module: RedisServer) -> None:
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url)
    limits = Limits(rpm=7, tpm=10_000, max_parallel=3)
    for limiter in (MemoryLimiter(), RedisLimiter(client, fallback=None)):
        state = await limiter.admit("k", limits, "r", 2500, WINDOW)
        assert [name for name, _ in state.headers] == [
            b"x-ratelimit-limit-requests",
            b"x-ratelimit-remaining-requests",
            b"x-ratelimit-reset-requests",
            b"x-ratelimit-limit-tokens",
            b"x-ratelimit-remaining-tokens",
            b"x-ratelimit-reset-tokens",
        ]
        values = dict(state.headers)
        assert values[b"x-ratelimit-limit-requests"] == b"7" and values[b"x-ratelimit-remaining-requests"] == b"6"
        assert values[b"x-ratelimit-limit-tokens"] == b"10000"
        assert values[b"x-ratelimit-remaining-tokens"] == b"7500"
        assert values[b"x-ratelimit-reset-requests"].endswith(b"s")
        tokens_only = await limiter.admit("t", Limits(tpm=100), "r", 1, WINDOW)
        assert [name for name, _ in tokens_only.headers] == [
            b"x-ratelimit-limit-tokens",
            b"x-ratelimit-remaining-tokens",
            b"x-ratelimit-reset-tokens",
        ]
    await client.aclose()


# --- both limiters, one contract ----------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[MemoryLimiter | RedisLimiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    server: RedisServer = request.getfixturevalue("redis_module")
    server.flush()
    client = redis.asyncio.Redis.from_url(server.url)
    yield RedisLimiter(client, fallback=None)
    await client.aclose()


async def admit_many(
    limiter: MemoryLimiter | RedisLimiter, limits: Limits, n: int, tokens: int = 1, window: float = WINDOW
) -> list[bool]:
    async def one(i: int) -> bool:
        try:
            await limiter.admit("k", limits, f"r{i}", tokens, window)
        except RateLimited:
            return False
        return True

    return await asyncio.gather(*(one(i) for i in range(n)))


async def settle(
    limiter: MemoryLimiter | RedisLimiter,
    limits: Limits,
    request_ids: list[str],
    delta: int,
    *,
    key_id: str = "k",
    local: bool = False,
) -> None:
    """Settle each request, wait until Redis has run the settlements, and check none failed."""
    failures: list[Exception] = []
    for request_id in request_ids:
        limiter.settle(key_id, limits, request_id, delta, WINDOW, failures.append, local=local)
    if isinstance(limiter, RedisLimiter):
        await limiter.drain()
    assert failures == []


async def test_fifty_concurrent_against_ten_admit_exactly_ten(limiter: MemoryLimiter | RedisLimiter) -> None:
    assert sum(await admit_many(limiter, Limits(rpm=10), 50)) == 10


async def test_rejection_says_when_to_retry(limiter: MemoryLimiter | RedisLimiter) -> None:
    await admit_many(limiter, Limits(rpm=2), 2)
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k", Limits(rpm=2), "late", 1, WINDOW)
    headers = info.value.headers
    assert 29 <= int(headers["retry-after"]) <= 31  # one request frees every 30 s
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "2"


async def test_tokens_reserved_then_admitted_after_the_window(limiter: MemoryLimiter | RedisLimiter) -> None:
    limits = Limits(tpm=100)
    await limiter.admit("k", limits, "a", 80, 1.0)
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k", limits, "b", 50, 1.0)
    assert "tokens" in info.value.message
    await asyncio.sleep(float(info.value.headers["retry-after-ms"]) / 1000 + 0.05)
    await limiter.admit("k", limits, "b", 50, 1.0)


async def test_request_larger_than_the_limit_is_refused_for_good(limiter: MemoryLimiter | RedisLimiter) -> None:
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k", Limits(tpm=100), "big", 101, WINDOW)
    assert "too large" in info.value.message and "retry-after" not in info.value.headers


async def test_settling_gives_back_unused_tokens(limiter: MemoryLimiter | RedisLimiter) -> None:
    limits = Limits(tpm=100)
    await limiter.admit("k", limits, "a", 90, WINDOW)
    await settle(limiter, limits, ["a"], -80)  # the reply used 10 of its 90
    await limiter.admit("k", limits, "b", 85, WINDOW)


async def test_settling_charges_overuse(limiter: MemoryLimiter | RedisLimiter) -> None:
    limits = Limits(tpm=100)
    await limiter.admit("k", limits, "a", 10, WINDOW)
    await settle(limiter, limits, ["a"], 80)  # the reply used 90, not 10
    with pytest.raises(RateLimited):
        await limiter.admit("k", limits, "b", 20, WINDOW)


async def test_parallel_slots_held_until_settled(limiter: MemoryLimiter | RedisLimiter) -> None:
    limits = Limits(max_parallel=2)
    admitted = await admit_many(limiter, limits, 3)
    assert sorted(admitted) == [False, True, True]  # which two win the race is the event loop's choice
    await settle(limiter, limits, [f"r{admitted.index(True)}"], 0)
    await limiter.admit("k", limits, "again", 1, WINDOW)


async def test_a_lease_never_released_expires(
    limiter: MemoryLimiter | RedisLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that dies mid-request never settles: its parallel slot frees itself when the lease
    runs out, and not before, while the other leases hold theirs."""
    limits = Limits(max_parallel=2)
    monkeypatch.setattr(gateway.limits, "LEASE_SECONDS", 0.5)
    await limiter.admit("k", limits, "lost", 1, WINDOW)
    monkeypatch.setattr(gateway.limits, "LEASE_SECONDS", 60.0)
    await limiter.admit("k", limits, "live", 1, WINDOW)
    with pytest.raises(RateLimited):
        await limiter.admit("k", limits, "early", 1, WINDOW)
    await asyncio.sleep(0.6)
    await limiter.admit("k", limits, "after", 1, WINDOW)
    with pytest.raises(RateLimited):  # "live" and "after" hold both slots
        await limiter.admit("k", limits, "next", 1, WINDOW)


async def test_concurrent_settlements_all_land(limiter: MemoryLimiter | RedisLimiter) -> None:
    """Settlements written together (Redis: group commit) each free their slot and book their tokens."""
    limits = Limits(tpm=10_000, max_parallel=40)
    assert all(await admit_many(limiter, limits, 40, tokens=200))  # 8,000 tokens reserved
    await settle(limiter, limits, [f"r{i}" for i in range(40)], -150)  # 50 used each
    # Every slot is free again, and 8,000 - 40 * 150 = 2,000 tokens are booked: 8,000 more fit.
    assert all(await admit_many(limiter, limits, 40, tokens=200))


async def test_keys_are_independent(limiter: MemoryLimiter | RedisLimiter) -> None:
    await limiter.admit("a", Limits(rpm=1), "1", 1, WINDOW)
    await limiter.admit("b", Limits(rpm=1), "2", 1, WINDOW)
    with pytest.raises(RateLimited):
        await limiter.admit("a", Limits(rpm=1), "3", 1, WINDOW)


async def test_a_key_whose_limits_change_is_held_to_the_new_ones(limiter: MemoryLimiter | RedisLimiter) -> None:
    await limiter.admit("k", Limits(rpm=3), "1", 1, WINDOW)  # 20 s of the window taken
    raised = await limiter.admit("k", Limits(rpm=10), "2", 1, WINDOW)  # and 6 more
    assert (b"x-ratelimit-limit-requests", b"10") in raised.headers
    assert (b"x-ratelimit-remaining-requests", b"5") in raised.headers
    longer = await limiter.admit("k", Limits(rpm=10), "3", 1, 2 * WINDOW)  # 12 more, of 120
    assert (b"x-ratelimit-remaining-requests", b"6") in longer.headers
    tokens = await limiter.admit("k", Limits(tpm=50), "5", 10, WINDOW)
    assert dict(tokens.headers) == {
        b"x-ratelimit-limit-tokens": b"50",
        b"x-ratelimit-remaining-tokens": b"40",
        b"x-ratelimit-reset-tokens": b"12s",
    }


@settings(max_examples=15, deadline=None)
@given(rpm=st.integers(1, 20), n=st.integers(1, 40))
def test_redis_and_memory_agree_on_bursts(redis_module: RedisServer, rpm: int, n: int) -> None:
    async def both() -> tuple[int, int]:
        redis_module.flush()
        client = redis.asyncio.Redis.from_url(redis_module.url)
        try:
            remote = sum(await admit_many(RedisLimiter(client, fallback=None), Limits(rpm=rpm), n))
        finally:
            await client.aclose()
        return remote, sum(await admit_many(MemoryLimiter(), Limits(rpm=rpm), n))

    remote, local = asyncio.run(both())
    assert remote == local == min(n, rpm)


async def test_redis_down_fails_open_on_the_local_limiter(tmp_path: Path) -> None:
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    limiter = RedisLimiter(client, fallback=MemoryLimiter())
    state = await limiter.admit("k", Limits(rpm=1), "a", 1, WINDOW)
    assert state.local and limiter.degraded
    with pytest.raises(RateLimited):  # still limited, per process
        await limiter.admit("k", Limits(rpm=1), "b", 1, WINDOW)
    await settle(limiter, Limits(rpm=1), ["a"], 0, local=True)
    await client.aclose()


async def test_redis_down_fails_closed_with_503() -> None:
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    with pytest.raises(ServiceUnavailable) as info:
        await RedisLimiter(client, fallback=None).admit("k", Limits(rpm=1), "a", 1, WINDOW)
    assert info.value.code == "rate_limits_unavailable"
    await client.aclose()


async def test_an_admission_settles_once_without_waiting(limiter: MemoryLimiter | RedisLimiter) -> None:
    """The request does not wait for its settlement; the settlement still frees the slot and gives
    back the unused tokens, once however often it is asked."""
    limits = Limits(tpm=1000, max_parallel=1)
    state = await limiter.admit("k", limits, "a", 900, WINDOW)
    admission = Admission(limiter, "k", limits, "a", 900, WINDOW, state)
    admission.settle(100)  # the reply used 100 of the 900 reserved
    admission.settle(100)
    if isinstance(limiter, RedisLimiter):
        await limiter.drain()
    await limiter.admit("k", limits, "b", 900, WINDOW)  # a free slot, and 100 + 900 tokens fit
    with pytest.raises(RateLimited):
        await limiter.admit("k", Limits(tpm=1000), "c", 1, WINDOW)  # given back once only


async def test_a_settlement_redis_refuses_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    limiter = RedisLimiter(client, fallback=None)
    admission = Admission(limiter, "k", Limits(max_parallel=1), "req-1", 10, WINDOW, State([]))
    admission.settle(5)
    await limiter.drain()
    assert "could not settle rate limits of request req-1" in caplog.text
    await client.aclose()


async def test_admission_survives_redis_forgetting_its_scripts(redis_module: RedisServer) -> None:
    # A Redis restart or SCRIPT FLUSH drops the loaded scripts: the next batch loads them again.
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url)
    limiter = RedisLimiter(client, fallback=None)
    assert sum(await admit_many(limiter, Limits(rpm=5), 3)) == 3
    await client.script_flush()
    assert sum(await admit_many(limiter, Limits(rpm=5), 4)) == 2  # the limit held across the reload
    assert limiter.redis_errors == 0
    await client.aclose()


async def test_concurrent_admissions_share_round_trips_and_keep_their_own_answers(redis_module: RedisServer) -> None:
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url)
    limiter = RedisLimiter(client, fallback=None)
    await limiter.admit("warm", Limits(rpm=100), "w", 1, WINDOW)  # loads the script
    await client.config_resetstat()
    results = await admit_many(limiter, Limits(rpm=10), 50)
    assert sum(results) == 10 and results[:10] == [True] * 10  # in order of arrival
    stats = await client.info("commandstats")
    # The 50 calls of one script on one key's keys went out as a handful of EVALSHAs, not 50.
    assert stats["cmdstat_evalsha"]["calls"] < 10
    await client.aclose()
