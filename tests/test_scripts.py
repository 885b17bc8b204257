"""Pipelined script calls (gateway/scripts.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio
import redis.asyncio.connection
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st

from gateway.scripts import BatchedScript, ScriptBatch, _pack, run_scripts, send_commands
from tests.conftest import RedisServer, free_port


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


async def _appending(server: RedisServer) -> tuple[redis.asyncio.Redis, ScriptBatch, BatchedScript]:
    """A client on an empty Redis with fresh command counts, a batch, and a batched script that
    pushes ARGS[1] onto KEYS[1] and returns ARGS[2] + 1."""
    server.flush()
    client = redis.asyncio.Redis.from_url(server.url)
    append = BatchedScript(client, "redis.call('RPUSH', KEYS[1], ARGS[1]); return tonumber(ARGS[2]) + 1", 2)
    await client.script_load(append.script.script)
    await client.config_resetstat()
    return client, ScriptBatch(client), append


async def test_a_batch_runs_each_call_once_in_order_and_isolates_failures(redis_module: RedisServer) -> None:
    client, batch, append = await _appending(redis_module)
    results = await asyncio.gather(
        batch.run(append, ["log"], ["a", 1]),
        batch.run(append, ["log"], ["b", "not a number"]),  # its push happened; its return failed
        batch.run(append, ["other"], ["c", 10]),
        batch.run(append, ["log"], ["d", 41]),
        return_exceptions=True,
    )
    assert results[0] == 2 and results[2] == 11 and results[3] == 42
    assert isinstance(results[1], redis.exceptions.ResponseError)
    assert await client.lrange("log", 0, -1) == [b"a", b"b", b"d"]
    assert await client.lrange("other", 0, -1) == [b"c"]
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 2  # one for each set of keys
    with pytest.raises(ValueError, match="takes 2 arguments"):
        await batch.run(append, ["log"], ["e"])
    await client.aclose()


async def test_a_batch_passes_each_argument_as_it_was_given(redis_module: RedisServer) -> None:
    # A call's arguments travel as one newline-joined string, split again by the Lua.
    redis_module.flush()
    client = redis.asyncio.Redis.from_url(redis_module.url, decode_responses=True)
    batch = ScriptBatch(client)
    echo = BatchedScript(client, "return {ARGS[1], ARGS[2], ARGS[3], tostring(#ARGS)}", 3)
    given = [["", "x y", "0.1"], ["tab\there", "", 1e-07], ["a:b/c", 1_700_000_000.123456, 42]]
    results = await asyncio.gather(*(batch.run(echo, ["k"], args) for args in given))
    assert results == [[str(a) for a in args] + ["3"] for args in given]
    assert float(results[1][2]) == 1e-07 and float(results[2][1]) == 1_700_000_000.123456
    with pytest.raises(ValueError, match="newline"):
        await batch.run(echo, ["k"], ["two\nlines", "", ""])
    await client.aclose()


async def test_a_batch_answers_every_caller_when_redis_is_unreachable() -> None:
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    batch = ScriptBatch(client)
    script = BatchedScript(client, "return 1", 0)
    results = await asyncio.gather(*(batch.run(script, ["k"], []) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results)
    await client.aclose()


async def test_a_batch_carries_on_when_redis_comes_back(tmp_path: Path) -> None:
    """A batch keeps one connection for its round trips: when Redis goes away it breaks, the calls
    then get the error, and the calls after Redis is back run on a new one (the scripts loaded
    again: a restarted Redis has forgotten them)."""
    server = RedisServer(tmp_path).start()
    client = redis.asyncio.Redis.from_url(server.url, socket_connect_timeout=0.5)
    try:
        batch = ScriptBatch(client)
        add = BatchedScript(client, "return redis.call('INCRBY', KEYS[1], ARGS[1])", 1)
        assert await asyncio.gather(*(batch.run(add, ["n"], [1]) for _ in range(3))) == [1, 2, 3]
        server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await batch.run(add, ["n"], [1])
        server.start()
        with contextlib.suppress(redis.exceptions.ConnectionError):
            await client.ping()  # the pool's own idle connection finds out it was closed
        assert await asyncio.gather(*(batch.run(add, ["n"], [10]) for _ in range(2))) == [10, 20]
    finally:
        await client.aclose()
        server.stop()


async def test_calls_sent_without_waiting_land_and_report_their_errors(redis_module: RedisServer) -> None:
    """``send`` shares batches with ``run``: its calls run in order with the others, nothing waits
    for them but ``drain``, and a failed one is reported to its own callback."""
    client, batch, append = await _appending(redis_module)
    failures: list[tuple[str, Exception]] = []
    batch.send(append, ["log"], "a\n1", lambda exc: failures.append(("a", exc)))
    batch.send(append, ["log"], "b\nnot a number", lambda exc: failures.append(("b", exc)))
    assert await batch.run(append, ["log"], ["c", 2]) == 3
    assert await client.lrange("log", 0, -1) == [b"a", b"b", b"c"]
    assert (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1  # all three in one batch
    assert [name for name, _ in failures] == ["b"]
    assert isinstance(failures[0][1], redis.exceptions.ResponseError)
    batch.send(append, ["log"], "d\n3", lambda exc: failures.append(("d", exc)))
    await batch.drain()
    assert await client.lrange("log", 0, -1) == [b"a", b"b", b"c", b"d"]
    with pytest.raises(ValueError, match="newline"):
        batch.send(append, ["log"], "one argument", lambda exc: None)
    await batch.drain()  # nothing under way: returns at once
    await client.aclose()


async def test_calls_sent_without_waiting_hear_that_redis_is_unreachable() -> None:
    client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.2)
    batch = ScriptBatch(client)
    script = BatchedScript(client, "return 1", 0)
    failures: list[Exception] = []
    for _ in range(3):
        batch.send(script, ["k"], "", failures.append)
    await batch.drain()
    assert len(failures) == 3 and all(isinstance(exc, redis.exceptions.ConnectionError) for exc in failures)
    await client.aclose()


_argument = st.one_of(st.text(), st.binary(), st.integers(), st.floats(allow_nan=False), st.binary().map(memoryview))


_command = st.tuples(st.sampled_from(["EVALSHA", "GET", "INCRBY"]), st.lists(_argument, max_size=8)).map(
    lambda command: [command[0], *command[1]]
)


@given(st.lists(_command, max_size=4))
def test_commands_are_packed_as_redis_py_packs_them(commands: list[list[object]]) -> None:
    connection = redis.asyncio.connection.Connection()
    assert _pack(commands, connection.encoder.encode) == b"".join(connection.pack_commands(commands))


async def test_a_round_trip_redis_does_not_answer_times_out(tmp_path: Path) -> None:
    """A Redis that hangs (paused, here) fails the round trip with redis-py's TimeoutError after the
    client's socket_timeout, retries included; once it answers again, the same connection works."""
    server = RedisServer(tmp_path).start()
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    connection = await client.connection_pool.get_connection()
    try:
        assert await send_commands(connection, [("INCRBY", "n", 2), ("GET", "n")]) == [2, b"2"]
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError, match=r"did not answer within 0\.3 s"):
                await send_commands(connection, [("INCRBY", "n", 1)])
            assert time.monotonic() - started < 5
        finally:
            server.process.send_signal(signal.SIGCONT)
        replies = await send_commands(connection, [("GET", "n"), ("INCRBY", "text", "x")])
        assert replies[0] in (b"2", b"3")  # whether the timed-out write ran is Redis's business
        assert isinstance(replies[1], redis.exceptions.ResponseError)
    finally:
        await client.connection_pool.release(connection)
        await client.aclose()
        server.stop()
