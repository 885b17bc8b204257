"""Per-key limits: requests and tokens per window, and requests at once.

Rates use GCRA (the generic cell rate algorithm): each limited dimension keeps one number, the
theoretical arrival time ``tat``. A limit of ``L`` per window ``W`` spends ``W / L`` seconds of it per
unit (request or token); a request fits while ``tat`` stays within ``W`` of now. That admits a burst of
``L`` and then one unit every ``W / L`` seconds, which matches a sliding window at its edges and costs
one number instead of a log of requests. The long-run rate is ``L`` per window; a single window can
see up to ``2L - 1`` (a full burst, then the steady trickle), where a strict sliding window caps it at
``L``.

A request reserves its estimated tokens (prompt estimate + ``max_tokens``, or the configured default)
at admission; when the reply ends, :meth:`Admission.settle` books the difference to the real usage.
Concurrency uses leases, a sorted set of in-flight request ids scored by expiry, so a replica that
dies mid-request cannot leak its slots.

With Redis, admission is one Lua script run on Redis's own clock, so every replica shares one limit
and concurrent requests cannot overshoot it. Concurrent admissions share round trips, and so do
concurrent settlements (:class:`ScriptBatch`): each still runs as its own script, and each caller
waits for its own answer.
Without Redis, or while Redis is unreachable under ``on_redis_error = "fail_open"``,
:class:`MemoryLimiter` applies the same arithmetic per process.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.responses import Headers
from gateway.scripts import BatchedScript, Failed, ScriptBatch

__all__ = ["Admission", "Limiter", "Limits", "MemoryLimiter", "RedisLimiter", "gcra", "reset_text"]

log = logging.getLogger("gateway.limits")

# A request's lease on a parallel slot: longer than any request may run (timeouts.total), so it only
# expires when its replica died without releasing it.
LEASE_SECONDS = 900.0
_EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel)


def gcra(tat: float, now: float, cost: float, limit: int, window: float) -> tuple[bool, float]:
    """One GCRA step: whether ``cost`` units fit, and the new ``tat`` (unchanged when they do not).
    A limit of 0 is no limit."""
    if limit <= 0:
        return True, tat
    start = max(tat, now)
    new = start + cost * window / limit
    if new - now > window + _EPSILON:
        return False, tat
    return True, new


def remaining(tat: float, now: float, limit: int, window: float) -> int:
    """Units still available now."""
    # Comparisons, not max(): this runs for every request the memory limiter admits, and a call of a
    # builtin costs more than the arithmetic.
    used = tat - now
    if used < 0.0:
        used = 0.0
    units = math.floor((window - used) * limit / window + _EPSILON)
    return units if units > 0 else 0


def retry_after(tat: float, now: float, cost: float, limit: int, window: float) -> float:
    """Seconds until ``cost`` units fit (infinite when they never can)."""
    if cost > limit:
        return math.inf
    return max(0.0, max(tat, now) + cost * window / limit - now - window)


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    # Formatting rounds as round(rest, 1) does, at a third of its cost.
    text = f"{rest:.1f}".removesuffix(".0") + "s"
    return f"{int(minutes)}m{text}" if minutes >= 1 else text


_LIMIT_REQUESTS = b"x-ratelimit-limit-requests"
_REMAINING_REQUESTS = b"x-ratelimit-remaining-requests"
_RESET_REQUESTS = b"x-ratelimit-reset-requests"
_LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
_REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
_RESET_TOKENS = b"x-ratelimit-reset-tokens"


@dataclass(slots=True)
class State:
    """What one admission leaves the client: its ``x-ratelimit-*`` headers, as they are sent."""

    headers: Headers
    local: bool = False
    """Admitted by this process's own limiter (Redis was unreachable); settled there too."""


@dataclass(slots=True)
class Admission:
    """An admitted request's reservation, settled once when its reply ends."""

    limiter: Limiter
    key_id: str
    limits: Limits
    request_id: str
    reserved: int
    window: float
    state: State
    settled: bool = field(default=False)

    @property
    def headers(self) -> Headers:
        return self.state.headers

    def settle(self, used_tokens: int | None) -> None:
        """Book the real usage (None: keep the estimate) and free the parallel slot. Sent, not
        waited for: nothing the request does next depends on it."""
        if self.settled:
            return
        self.settled = True
        delta = 0 if used_tokens is None else used_tokens - self.reserved
        self.limiter.settle(
            self.key_id, self.limits, self.request_id, delta, self.window, self._failed, local=self.state.local
        )

    def _failed(self, exc: Exception) -> None:
        # The lease expires on its own; a lost token correction only skews one window.
        log.warning("could not settle rate limits of request %s: %s", self.request_id, exc)


def _headers(limits: Limits, texts: tuple[bytes, bytes], values: list[bytes]) -> Headers:
    """The headers of the dimensions ``limits`` limits: ``texts`` are the limits of requests and
    tokens, ``values`` the remaining requests, their reset, the remaining tokens and theirs."""
    out: Headers = []
    if limits.rpm:
        out += ((_LIMIT_REQUESTS, texts[0]), (_REMAINING_REQUESTS, values[0]), (_RESET_REQUESTS, values[1]))
    if limits.tpm:
        out += ((_LIMIT_TOKENS, texts[1]), (_REMAINING_TOKENS, values[2]), (_RESET_TOKENS, values[3]))
    return out


def headers(limits: Limits, now: float, request_tat: float, token_tat: float, window: float) -> Headers:
    """The headers after an admission that left these ``tat``s at ``now``."""
    values = []
    for tat, limit in ((request_tat, limits.rpm), (token_tat, limits.tpm)):
        if limit:
            values += (b"%d" % remaining(tat, now, limit, window), reset_text(max(tat - now, 0.0)).encode())
        else:
            values += (b"", b"")
    return _headers(limits, (b"%d" % limits.rpm, b"%d" % limits.tpm), values)


def texts(headers: Headers) -> dict[str, str]:
    """``headers`` as a :class:`GatewayError` carries them."""
    return {name.decode(): value.decode() for name, value in headers}


def _rejection(reason: str, limits: Limits, state: State, window: float, wait: float) -> RateLimited:
    extra = texts(state.headers)
    if math.isinf(wait):
        return RateLimited(
            f"Request too large: it needs more tokens than the key's limit of {limits.tpm} per "
            f"{window:g} s. Lower max_tokens or shorten the messages.",
            headers=extra,
        )
    extra["retry-after"] = str(max(1, math.ceil(wait)))
    extra["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    what = {
        "rpm": f"{limits.rpm} requests",
        "tpm": f"{limits.tpm} tokens",
        "parallel": f"{limits.max_parallel} requests at once",
    }[reason]
    when = f"Try again in {wait:.1f} s." if reason != "parallel" else "Try again when one finishes."
    return RateLimited(
        f"Rate limit reached: this key may make {what}{'' if reason == 'parallel' else f' per {window:g} s'}. {when}",
        headers=extra,
    )


class Limiter(Protocol):
    async def admit(self, key_id: str, limits: Limits, request_id: str, tokens: int, window: float) -> State:
        """Reserve one request and ``tokens``, or raise :class:`RateLimited`."""

    def settle(
        self,
        key_id: str,
        limits: Limits,
        request_id: str,
        delta: int,
        window: float,
        failed: Failed,
        *,
        local: bool = False,
    ) -> None:
        """Book ``delta`` more tokens (fewer when negative) and free the request's parallel slot:
        started, not waited for; ``failed`` hears of its error."""


class MemoryLimiter:
    """The same arithmetic, in this process only."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], float] = {}
        self._leases: dict[str, dict[str, float]] = {}

    async def admit(self, key_id: str, limits: Limits, request_id: str, tokens: int, window: float) -> State:
        now = self._clock()
        request_tat = self._tats.get((key_id, "r"), now)
        token_tat = self._tats.get((key_id, "t"), now)
        state = State(headers(limits, now, request_tat, token_tat, window))
        if limits.tpm and tokens > limits.tpm:
            raise _rejection("tpm", limits, state, window, math.inf)
        leases = self._leases.setdefault(key_id, {})
        for member, expiry in list(leases.items()):
            if expiry <= now:
                del leases[member]
        if limits.max_parallel and len(leases) >= limits.max_parallel:
            raise _rejection("parallel", limits, state, window, 0)
        ok, new_request_tat = gcra(request_tat, now, 1, limits.rpm, window)
        if not ok:
            raise _rejection("rpm", limits, state, window, retry_after(request_tat, now, 1, limits.rpm, window))
        ok, new_token_tat = gcra(token_tat, now, tokens, limits.tpm, window)
        if not ok:
            raise _rejection("tpm", limits, state, window, retry_after(token_tat, now, tokens, limits.tpm, window))
        if limits.rpm:
            self._tats[(key_id, "r")] = new_request_tat
        if limits.tpm:
            self._tats[(key_id, "t")] = new_token_tat
        if limits.max_parallel:
            leases[request_id] = now + LEASE_SECONDS
        return State(headers(limits, now, new_request_tat, new_token_tat, window))

    def settle(
        self,
        key_id: str,
        limits: Limits,
        request_id: str,
        delta: int,
        window: float,
        failed: Failed,
        *,
        local: bool = False,
    ) -> None:
        self._leases.get(key_id, {}).pop(request_id, None)
        if limits.tpm and delta:
            now = self._clock()
            tat = self._tats.get((key_id, "t"), now)
            self._tats[(key_id, "t")] = max(now, max(tat, now) + delta * window / limits.tpm)


# The values of the x-ratelimit-* headers, written as remaining() and reset_text() write them: the
# same double arithmetic in the same order, divmod as Python's float divmod, '%.1f' rounded as
# Python's format() rounds (both exactly). tests/test_limits.py holds the two to each other.
_HEADER_VALUES = """
local function remaining(tat, now, limit, window)
  local used = tat - now
  if used < 0 then used = 0 end
  local units = math.floor((window - used) * limit / window + 1e-6)
  if units < 0 then units = 0 end
  return string.format('%d', units)
end
local function reset(seconds)
  if seconds < 0 then seconds = 0 end
  if seconds < 1 then return string.format('%dms', math.ceil(seconds * 1000)) end
  local rest = math.fmod(seconds, 60)
  local quotient = (seconds - rest) / 60
  local minutes = math.floor(quotient)
  if quotient - minutes > 0.5 then minutes = minutes + 1 end
  local text = string.format('%.1f', rest)
  if string.sub(text, -2) == '.0' then text = string.sub(text, 1, -3) end
  if minutes >= 1 then return string.format('%dm%ss', minutes, text) end
  return text .. 's'
end
"""

# KEYS: request tat, token tat, leases. ARGS: window, rpm, tpm, max_parallel, lease, tokens, request id.
# Returns "status wait remaining-requests reset-requests remaining-tokens reset-tokens", one string:
# Redis truncates Lua numbers to integers on the way out, and one string costs Redis less to return
# than six. The header values are written here, not from the tats in Python: parsing three 17-digit
# floats and writing the headers cost the gateway more than the rest of the admission ("-" for a
# dimension without a limit). Tats are stored with 17 digits: tostring's 14 round a tat near 1.7e9 s
# to 0.1 ms, and a burst of calls microseconds apart adds up those errors past GCRA's tolerance.
# Leases are scored by their expiry in whole milliseconds (an integer score is cheaper for Redis to
# take than a fraction), and swept only when they could refuse a request: most admissions find the
# set below the limit and skip the sweep.
# status: 1 admitted, 0 over rpm, -1 over tpm, -2 over max_parallel.
_ADMIT = (
    _HEADER_VALUES
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGS[1])
local rpm, tpm, parallel = tonumber(ARGS[2]), tonumber(ARGS[3]), tonumber(ARGS[4])
local tokens = tonumber(ARGS[6])
local rtat = tonumber(redis.call('GET', KEYS[1]) or now)
local ttat = tonumber(redis.call('GET', KEYS[2]) or now)
local function out(status, wait, r, k)
  local rr, rs, tr, ts = '-', '-', '-', '-'
  if rpm > 0 then rr, rs = remaining(r, now, rpm, window), reset(r - now) end
  if tpm > 0 then tr, ts = remaining(k, now, tpm, window), reset(k - now) end
  return string.format('%d %.17g %s %s %s %s', status, wait, rr, rs, tr, ts)
end
if tpm > 0 and tokens > tpm then return out(-1, -1, rtat, ttat) end
if parallel > 0 and redis.call('ZCARD', KEYS[3]) >= parallel then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', math.floor(now * 1000))
  if redis.call('ZCARD', KEYS[3]) >= parallel then return out(-2, 0, rtat, ttat) end
end
local nr, nt = rtat, ttat
if rpm > 0 then
  nr = math.max(rtat, now) + window / rpm
  if nr - now > window + 1e-6 then return out(0, nr - now - window, rtat, ttat) end
end
if tpm > 0 then
  nt = math.max(ttat, now) + tokens * window / tpm
  if nt - now > window + 1e-6 then return out(-1, nt - now - window, rtat, ttat) end
end
local function exact(x) return string.format('%.17g', x) end
if rpm > 0 then redis.call('SET', KEYS[1], exact(nr), 'PX', math.ceil((nr - now + 1) * 1000)) end
if tpm > 0 then redis.call('SET', KEYS[2], exact(nt), 'PX', math.ceil((nt - now + 1) * 1000)) end
if parallel > 0 then
  local lease = tonumber(ARGS[5])
  redis.call('ZADD', KEYS[3], math.floor((now + lease) * 1000), ARGS[7])
  redis.call('PEXPIRE', KEYS[3], math.ceil(lease * 1000))
end
return out(1, 0, nr, nt)
"""
)

# KEYS: token tat, leases. ARGS: request id, token delta, window, tpm.
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGS[1])
local delta, window, tpm = tonumber(ARGS[2]), tonumber(ARGS[3]), tonumber(ARGS[4])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
  tat = math.max(now, tat + delta * window / tpm)
  redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now + 1) * 1000))
end
return 1
"""

_REASONS = {0: "rpm", -1: "tpm", -2: "parallel"}


@dataclass(frozen=True, slots=True)
class _Plan:
    """What every admission and settlement of one key sends, worked out once per key rather than
    for each call: the Redis keys, and the arguments that do not change between requests."""

    limits: Limits
    window: float
    lease: float
    keys: tuple[str, str, str]
    """Request tat, token tat, leases: as _ADMIT takes them."""
    settle_keys: tuple[str, str]
    """Token tat, leases: as _SETTLE takes them."""
    admit_head: str
    """_ADMIT's window, rpm, tpm, max_parallel and lease, each followed by a newline."""
    settle_tail: str
    """_SETTLE's window and tpm, each after a newline."""
    limit_texts: tuple[bytes, bytes]
    """The limits of requests and tokens, as the headers write them."""


class RedisLimiter:
    """One limit across every replica that shares the Redis. While Redis is unreachable, admission
    falls back to ``fallback`` (fail open) or refuses with 503 (fallback None: fail closed)."""

    def __init__(self, redis: Any, *, fallback: MemoryLimiter | None, prefix: str = "gw:rl") -> None:
        self._redis = redis
        self._admit = BatchedScript(redis, _ADMIT, 7)
        self._settle = BatchedScript(redis, _SETTLE, 4)
        self._fallback = fallback
        self._prefix = prefix
        self.degraded: str | None = None
        """Why Redis failed, while admission runs on the fallback."""
        self.redis_errors = 0
        """Admissions Redis failed (each one fell back, or was refused)."""
        # Settlements in their own batches: an admission, which a request waits for, then never
        # waits for Redis to run the settlements sent with it.
        self._admissions = ScriptBatch(redis)
        self._settlements = ScriptBatch(redis)
        self._plans: dict[str, _Plan] = {}

    def _plan(self, key_id: str, limits: Limits, window: float) -> _Plan:
        plan = self._plans.get(key_id)
        # A key's limits are one object while its record is cached (gateway/auth.py): most calls
        # stop at the identity check.
        if (
            plan is None
            or (plan.limits is not limits and plan.limits != limits)
            or plan.window != window
            or plan.lease != LEASE_SECONDS
        ):
            if len(self._plans) > 10_000:
                self._plans.clear()  # virtual keys come and go: the plans must not pile up
            base = f"{self._prefix}:{{{key_id}}}"
            plan = self._plans[key_id] = _Plan(
                limits,
                window,
                LEASE_SECONDS,
                (f"{base}:r", f"{base}:t", f"{base}:p"),
                (f"{base}:t", f"{base}:p"),
                f"{window}\n{limits.rpm}\n{limits.tpm}\n{limits.max_parallel}\n{LEASE_SECONDS}\n",
                f"\n{window}\n{limits.tpm}",
                (b"%d" % limits.rpm, b"%d" % limits.tpm),
            )
        return plan

    async def admit(self, key_id: str, limits: Limits, request_id: str, tokens: int, window: float) -> State:
        plan = self._plan(key_id, limits, window)
        # window, rpm, tpm, max_parallel, lease, tokens, request id: as _ADMIT reads them
        packed = f"{plan.admit_head}{tokens}\n{request_id}"
        try:
            answer = await self._admissions.run_packed(self._admit, plan.keys, packed)
        except (RedisError, OSError) as exc:
            return await self._unavailable(exc, key_id, limits, request_id, tokens, window)
        if self.degraded is not None:
            log.info("rate limits are back on Redis")
            self.degraded = None
        status, wait, *values = answer.split()
        state = State(_headers(limits, plan.limit_texts, values))
        if status != b"1":
            seconds = float(wait)
            raise _rejection(_REASONS[int(status)], limits, state, window, math.inf if seconds < 0 else seconds)
        return state

    async def _unavailable(
        self, exc: Exception, key_id: str, limits: Limits, request_id: str, tokens: int, window: float
    ) -> State:
        self.redis_errors += 1
        if self.degraded is None:
            log.warning(
                "rate limits cannot reach Redis (%s): %s",
                exc,
                "admitting on this process's own limits" if self._fallback else "refusing requests",
            )
        self.degraded = str(exc) or type(exc).__name__
        if self._fallback is None:
            raise ServiceUnavailable(
                "Rate limits cannot be checked right now, and this gateway refuses requests then "
                '([limits] on_redis_error = "fail_closed"). Retry shortly.',
                code="rate_limits_unavailable",
            ) from None
        state = await self._fallback.admit(key_id, limits, request_id, tokens, window)
        state.local = True
        return state

    def settle(
        self,
        key_id: str,
        limits: Limits,
        request_id: str,
        delta: int,
        window: float,
        failed: Failed,
        *,
        local: bool = False,
    ) -> None:
        if local:
            assert self._fallback is not None
            self._fallback.settle(key_id, limits, request_id, delta, window, failed)
            return
        plan = self._plan(key_id, limits, window)
        # request id, token delta, window, tpm: as _SETTLE reads them
        packed = f"{request_id}\n{delta}{plan.settle_tail}"
        self._settlements.send(self._settle, plan.settle_keys, packed, failed)

    async def drain(self) -> None:
        """Until the settlements sent so far have been answered: at shutdown, and in tests."""
        await self._settlements.drain()
