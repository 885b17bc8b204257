"""The gateway's Redis client against a real redis-server that restarts."""

from __future__ import annotations

from gateway.app import _redis_client
from tests.conftest import RedisServer


async def test_a_command_after_a_redis_restart_is_answered_not_failed(redis_server: RedisServer) -> None:
    # Every pooled connection is stale once the server restarts: its first command must go out again
    # on a new connection rather than fail the request that sent it.
    client = _redis_client(redis_server.url)
    try:
        await client.set("k", b"before")
        redis_server.stop()
        redis_server.start()
        assert await client.get("k") is None  # a new, empty server answered
        await client.set("k", b"after")
        assert await client.get("k") == b"after"
    finally:
        await client.aclose()
