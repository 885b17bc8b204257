"""Running many Lua script calls in few round trips.

:func:`run_scripts` sends calls as one pipeline. redis-py's own pipeline support for scripts asks
Redis ``SCRIPT EXISTS`` before every pipeline: a round trip more each time. Here each call is an
``EVALSHA``; when Redis has forgotten a script (a restart, ``SCRIPT FLUSH``), the calls that got
``NOSCRIPT`` load it and run again, once.

:class:`ScriptBatch` is a group commit on top: the calls made while one batch is on its way to Redis
go out together in the next, and the calls of one :class:`BatchedScript` on the same keys share a
single ``EVALSHA``, whose Lua runs the script's body once per call. Each call is still atomic, each
caller gets its own result or error, and one call's error does not stop the others'. Under
concurrency this turns two commands per request into a few per batch: redis-py spends more CPU on a
command (packing it, reading its reply under a timeout) than Redis spends running the script. For the
same reason each call's arguments travel as one string, joined by newlines and split by the Lua:
redis-py packs a command argument by argument, re-joining its buffer for each. A batcher sends its
batches on one connection it holds, past redis-py's pipeline and pool, which cost as much CPU as the
round trip itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions
from redis.exceptions import NoScriptError, ResponseError

from gateway.deadline import Deadline

__all__ = ["BatchedScript", "Call", "Failed", "ScriptBatch", "run_scripts", "send_commands"]

Call = tuple[Any, Sequence[Any], Sequence[Any]]
"""A script from ``register_script``, its keys, its arguments."""

Failed = Callable[[Exception], None]
"""Told the error of a call sent with :meth:`ScriptBatch.send`."""


async def run_scripts(redis: Any, calls: Sequence[Call], connection: Any = None) -> list[Any]:
    """Each call's result, or the error it raised, in order; a connection error raises. On
    ``connection`` (one the caller holds, see :func:`send_commands`) rather than a pooled one."""
    send = _pipelined if connection is None else functools.partial(_sent_on, connection)
    results = await send(redis, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            await redis.script_load(script.script)
        for i, result in zip(missing, await send(redis, [calls[i] for i in missing]), strict=True):
            results[i] = result
    return results


async def _pipelined(redis: Any, calls: Sequence[Call]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


async def _sent_on(connection: Any, redis: Any, calls: Sequence[Call]) -> list[Any]:
    """What :func:`_pipelined` does, on a connection the caller holds."""
    return await send_commands(
        connection, [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]
    )


async def send_commands(connection: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Each command's raw reply, or the ``ResponseError`` it got, in order, in one round trip on a
    connection the caller holds, taken from the pool once rather than for each round trip:
    redis-py's pipeline and pool cost about 60 us a round trip (``python -m
    tests.bench.redis_calls``), where the round trip itself costs about as much.

    The connection's ``socket_timeout`` bounds the whole round trip, under one :class:`Deadline`:
    redis-py's own calls time the write with ``asyncio.wait_for`` (a task each, 18 us here) and
    each reply with an ``asyncio.timeout`` of its own (10 us). A broken connection is retried as
    redis-py's own calls are, by the connection's retry policy."""
    packed = [_pack(commands, connection.encoder.encode)]

    async def attempt() -> list[Any]:
        try:
            if not connection.is_connected:
                await connection.connect()
            timeout = connection.socket_timeout
            with Deadline(timeout) if timeout is not None else contextlib.nullcontext():
                await connection._send_packed_command(packed)
                results: list[Any] = []
                for _ in commands:
                    try:
                        results.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
            return results
        except BaseException as exc:
            # Replies may be left unread: the connection starts again from nothing on its next use.
            await connection.disconnect(nowait=True)
            # As redis-py's calls raise them, for its retry policy and for callers.
            if isinstance(exc, TimeoutError):
                raise redis.exceptions.TimeoutError(
                    f"Redis did not answer within {connection.socket_timeout} s"
                ) from None
            if isinstance(exc, OSError):
                raise redis.exceptions.ConnectionError(f"Error while talking to Redis: {exc}") from exc
            raise

    return await connection.retry.call_with_retry(attempt, _ignore)  # type: ignore[no-any-return]


def _pack(commands: Sequence[Sequence[Any]], encode: Callable[[Any], bytes]) -> bytes:
    """The commands in Redis's protocol (RESP), as redis-py's ``pack_commands`` writes them, at a
    third of its CPU: it copies its growing buffer for each argument, and a history batch has one
    argument per record. Text goes as UTF-8, numbers as their ``repr``; anything else as redis-py's
    encoder would send it."""
    out: list[bytes] = []
    add = out.append
    for command in commands:
        add(b"*%d\r\n" % len(command))
        for arg in command:
            if arg.__class__ is str:
                arg = arg.encode()
            elif arg.__class__ is not bytes:
                arg = encode(arg)
            add(b"$%d\r\n" % len(arg))
            add(arg)
            add(b"\r\n")
    return b"".join(out)


async def _ignore(error: Exception) -> None:
    """The retry's failure handler: :func:`send_commands` has already dropped the connection."""


# The body runs as a function of ``ARGS`` (one call's arguments, split from one ARGV) once per call;
# pcall keeps one call's error (a Lua error, or a failed redis.call) from undoing or stopping the
# calls after it.
_LOOP = """
local function call(ARGS)
%s
end
local out = {}
for i = 1, #ARGV do
  local packed, args, start = ARGV[i], {}, 1
  while true do
    local stop = string.find(packed, '\\n', start, true)
    if not stop then
      args[#args + 1] = string.sub(packed, start)
      break
    end
    args[#args + 1] = string.sub(packed, start, stop - 1)
    start = stop + 1
  end
  local ok, result = pcall(call, args)
  if ok then
    out[#out + 1] = result
  else
    out[#out + 1] = {err = type(result) == 'table' and result.err or tostring(result)}
  end
end
return out
"""


class BatchedScript:
    """A Lua body that reads its arguments from ``ARGS`` (``width`` of them, as strings: numbers, or
    text without a newline) and returns a value other than nil; :class:`ScriptBatch` runs it for
    many calls on the same keys in one go."""

    def __init__(self, redis: Any, body: str, width: int) -> None:
        self.width = width
        self.newlines = max(width - 1, 0)
        """In the one string its arguments travel as."""
        self.script = redis.register_script(_LOOP % body)


_Calls = tuple[list[str], list[asyncio.Future[Any] | Failed]]
"""Calls of one script on the same keys: their arguments and, in the same order, who hears of
their answers."""


class ScriptBatch:
    """Group commit of :class:`BatchedScript` calls (see the module's docstring)."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pending: dict[tuple[BatchedScript, tuple[str, ...]], _Calls] = {}
        """The next batch's calls, grouped as they come: one EVALSHA for each script and keys."""
        self._writer: asyncio.Task[None] | None = None
        self._connection: Any = None
        """Taken from the client's pool once and kept: one batch is on its way at a time. The pool
        closes it with the client."""

    async def run(self, script: BatchedScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``script`` on ``keys`` and ``args``: its result, or its error."""
        if len(args) != script.width:
            raise ValueError(f"the script takes {script.width} arguments, not {len(args)}")
        return await self.run_packed(script, keys, "\n".join(map(str, args)))

    def run_packed(self, script: BatchedScript, keys: Sequence[str], packed: str) -> asyncio.Future[Any]:
        """:meth:`run` with the arguments already joined by newlines, for a caller that keeps the
        parts that do not change between its calls: formatting a float costs more than the call's
        share of the round trip. The caller awaits the future it returns (a coroutine around it
        would cost a frame per call)."""
        done = asyncio.get_running_loop().create_future()
        self._add(script, keys, packed, done)
        return done

    def send(self, script: BatchedScript, keys: Sequence[str], packed: str, failed: Failed) -> None:
        """:meth:`run_packed` for a caller that does not need the answer: it goes in the next batch,
        and ``failed`` hears of its error. No future is made and no caller resumes for it.
        :meth:`drain` waits until it has been answered."""
        self._add(script, keys, packed, failed)

    def _add(self, script: BatchedScript, keys: Sequence[str], packed: str, done: asyncio.Future[Any] | Failed) -> None:
        if packed.count("\n") != script.newlines:
            raise ValueError(f"the script takes {script.width} arguments without a newline")
        group = (script, tuple(keys))
        calls = self._pending.get(group)
        if calls is None:
            calls = self._pending[group] = ([], [])
        calls[0].append(packed)
        calls[1].append(done)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def drain(self) -> None:
        """Until every call made so far has been answered (or has failed)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                calls: list[Call] = [(script.script, keys, args) for (script, keys), (args, _) in batch.items()]
                try:
                    if self._connection is None:
                        self._connection = await self._redis.connection_pool.get_connection()
                    results = await run_scripts(self._redis, calls, self._connection)
                except Exception as exc:
                    results = [exc] * len(calls)
                for (_, answered), result in zip(batch.values(), results, strict=True):
                    outcomes = [result] * len(answered) if isinstance(result, Exception) else result
                    for done, outcome in zip(answered, outcomes, strict=True):
                        if not isinstance(done, asyncio.Future):
                            if isinstance(outcome, Exception):
                                done(outcome)
                        elif done.done():
                            continue  # its caller was cancelled
                        elif isinstance(outcome, Exception):
                            done.set_exception(outcome)
                        else:
                            done.set_result(outcome)
        finally:
            self._writer = None
