"""Running many Lua script calls in one pipelined round trip.

redis-py's own pipeline support for scripts asks Redis ``SCRIPT EXISTS`` before every pipeline: a
round trip more each time. Here each call is an ``EVALSHA``; when Redis has forgotten a script (a
restart, ``SCRIPT FLUSH``), the calls that got ``NOSCRIPT`` load it and run again, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["Call", "run_scripts"]

Call = tuple[Any, Sequence[Any], Sequence[Any]]
"""A script from ``register_script``, its keys, its arguments."""


async def run_scripts(redis: Any, calls: Sequence[Call]) -> list[Any]:
    """Each call's result, or the error it raised, in order; a connection error raises."""
    results = await _pipelined(redis, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            await redis.script_load(script.script)
        for i, result in zip(missing, await _pipelined(redis, [calls[i] for i in missing]), strict=True):
            results[i] = result
    return results


async def _pipelined(redis: Any, calls: Sequence[Call]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
