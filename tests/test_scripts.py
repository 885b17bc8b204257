"""Pipelined script calls (gateway/scripts.py) against a real redis-server."""

from __future__ import annotations

import redis.asyncio
import redis.exceptions

from gateway.scripts import run_scripts
from tests.conftest import RedisServer


async def test_each_call_gets_its_own_result_or_error_in_one_round_trip(redis_module: RedisServer) -> None:
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url)
    add = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await client.script_load(add.script)
    await client.config_resetstat()
    results = await run_scripts(client, [(add, ["n"], [1]), (add, ["n"], ["x"]), (add, ["n"], [10])])
    assert results[0] == 1 and results[2] == 11
    assert isinstance(results[1], redis.exceptions.ResponseError)
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert "cmdstat_script|exists" not in stats  # no round trip to ask whether the script is loaded
    await client.aclose()


async def test_scripts_redis_forgot_are_loaded_and_their_calls_run_once(redis_module: RedisServer) -> None:
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url)
    add = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await client.script_flush()
    assert await run_scripts(client, [(add, ["n"], [1]), (add, ["n"], [2])]) == [1, 3]
    assert await client.get("n") == b"3"  # not run twice
    assert await run_scripts(client, []) == []
    await client.aclose()
