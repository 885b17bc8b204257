"""The app factory. Everything the app uses is opened by its lifespan, kept on ``app.state`` and closed
on the way out; tests hand in their own clients instead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State

from gateway import admin_api, api, history_api, probes
from gateway.auth import Authenticator, authenticate
from gateway.backends import build_backends, discover_all, discover_forever
from gateway.errors import exception_handlers
from gateway.history import History
from gateway.keys import MemoryKeyStore, RedisKeyStore
from gateway.limits import MemoryLimiter, RedisLimiter
from gateway.playground import playground
from gateway.request import add_request_id
from gateway.settings import Settings
from gateway.stores.base import HistoryStore
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore
from gateway.usage import MemoryUsage, RedisUsage

__all__ = ["create_app", "default_http_client"]

log = logging.getLogger("gateway")

_HISTORY_DRAIN_SECONDS = 5.0


def default_http_client() -> httpx.AsyncClient:
    """httpx's API over aiohttp's connection pool: under concurrent streams httpx's own pool falls
    to a fraction of aiohttp's throughput (README, Performance). Pool limits sit far above what one
    process relays at once, so the pool never queues requests the backends could take."""
    limits = httpx.Limits(max_connections=8192, max_keepalive_connections=1024, keepalive_expiry=30)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=None)


def _redis_client(url: str) -> Any:
    from redis.asyncio import Redis

    # Short socket timeouts: a Redis outage must fail a request fast, not hang it (history queues,
    # conversation reads answer 503).
    return Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=10)


def _history_store(settings: Settings, redis: Any) -> HistoryStore:
    ttl = settings.history.ttl_days * 86_400 or None
    if redis is not None:
        return RedisStore(redis, ttl_seconds=ttl, max_items=settings.history.max_items)
    return MemoryStore(ttl_seconds=ttl, max_items=settings.history.max_items)


def _access(state: State, settings: Settings) -> None:
    """Keys, limits and usage: in Redis when there is one, so they hold across replicas."""
    redis = state.redis
    state.auth = Authenticator(settings, RedisKeyStore(redis) if redis is not None else MemoryKeyStore())
    local = MemoryLimiter()
    if redis is None:
        state.limiter = local
    else:
        fallback = local if settings.limits.on_redis_error == "fail_open" else None
        state.limiter = RedisLimiter(redis, fallback=fallback)
    ttl = settings.history.ttl_days * 86_400 or None
    state.usage = RedisUsage(redis, ttl_seconds=ttl) if redis is not None else MemoryUsage()
    # Usage is counted per key; an open gateway has none to count for.
    state.accounting = not state.auth.open
    state.default_tokens = settings.limits.default_max_tokens
    if state.auth.open:
        log.warning(
            "OPEN MODE: no API keys and no master key are configured, so anyone who can reach this port may "
            "use every model without limits. Configure [[keys]] or [auth] master_key before exposing it."
        )


def create_app(settings: Settings, *, http: httpx.AsyncClient | None = None, redis: Any = None) -> Litestar:
    """The gateway as an ASGI app. ``http`` and ``redis``, when given, are used as they are and left
    open: whoever made them closes them."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            client = http
            if client is None:
                client = default_http_client()
                stack.push_async_callback(client.aclose)
            app.state.http = client
            app.state.backends = backends = build_backends(settings, client)
            for backend in backends:
                if backend.client is not client:
                    stack.push_async_callback(backend.client.aclose)
            app.state.redis = redis
            if redis is None and settings.redis.url:
                app.state.redis = _redis_client(settings.redis.url)
                stack.push_async_callback(app.state.redis.aclose)
            app.state.history = history = History(_history_store(settings, app.state.redis), settings.history)
            _access(app.state, settings)
            await discover_all(backends, timeout=settings.timeouts.connect)
            tasks = [
                asyncio.create_task(discover_forever(backends, settings.discovery.interval, settings.timeouts.connect)),
                asyncio.create_task(history.run()),
            ]
            for task in tasks:
                stack.callback(task.cancel)
            # Runs first on the way out: records of the last replies get written before the writer stops.
            stack.push_async_callback(history.drain, _HISTORY_DRAIN_SECONDS)
            yield

    cors = settings.server.cors_origins
    return Litestar(
        route_handlers=[
            Router(path="/v1", route_handlers=[*api.handlers, *history_api.handlers], guards=[authenticate]),
            Router(path="/", route_handlers=[api.legacy_chat], guards=[authenticate]),
            admin_api.router,
            playground,
            probes.health,
            probes.ready,
        ],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        before_send=[add_request_id],
        request_max_body_size=settings.server.max_body_size,
        cors_config=CORSConfig(allow_origins=cors, expose_headers=["x-request-id"]) if cors else None,
        openapi_config=None,
        # The CLI configures logging; Litestar's default config would replace it.
        logging_config=None,
        state=State({"settings": settings, "started_at": int(time.time()), "redis": None, "backends": []}),
    )
