"""The app factory. Everything the app uses is opened by its lifespan, kept on ``app.state`` and closed
on the way out; tests hand in their own clients instead."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from prometheus_client import CollectorRegistry

from gateway import admin_api, api, history_api, probes, resumable, websocket
from gateway.auth import Authenticator, authenticate_request
from gateway.backends import build_backends, check_forever, discover_all, discover_forever
from gateway.errors import exception_handlers
from gateway.history import History
from gateway.keys import MemoryKeyStore, RedisKeyStore
from gateway.limits import MemoryLimiter, RedisLimiter
from gateway.metrics import Metrics, scrape
from gateway.observe import Observer
from gateway.playground import playground
from gateway.resumable import Generations, MemoryLog, RedisLog
from gateway.settings import Settings
from gateway.stores.base import HistoryStore, StoreUnavailable
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore
from gateway.tracing import Tracing
from gateway.transport import Transport
from gateway.usage import MemoryUsage, RedisUsage

__all__ = ["AppState", "create_app", "default_http_client"]

log = logging.getLogger("gateway")

_HISTORY_DRAIN_SECONDS = 5.0
_API = "/v1"


class AppState(State):
    """Litestar's ``State``, whose values read by attribute as fast as any attribute. ``State`` keeps
    them in a dict behind ``__getattr__``, which Python calls only after looking the name up as an
    attribute has failed: 0.7 us a read, and a request reads about a dozen (settings, backends,
    history...). Here each value is also an attribute of the instance, kept in step by every write;
    a key named like one of the mapping's methods stays readable only as an item."""

    def __init__(self, state: Any = None, deep_copy: bool = False) -> None:
        super().__init__(state, deep_copy=deep_copy)
        for key, value in self._state.items():
            self._mirror(key, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._mirror(key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        self._mirror(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.__dict__.pop(key, None)

    def __delattr__(self, key: str) -> None:
        super().__delattr__(key)
        self.__dict__.pop(key, None)

    def _mirror(self, key: str, value: Any) -> None:
        if not hasattr(type(self), key):
            self.__dict__[key] = value


def default_http_client() -> httpx.AsyncClient:
    """httpx's API over the gateway's own transport (gateway/transport.py)."""
    return httpx.AsyncClient(transport=Transport(), timeout=None)


def _redis_client(url: str) -> Any:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    # Short socket timeouts: a Redis outage must fail a request fast, not hang it (history queues,
    # conversation reads answer 503). One retry on a new connection for a connection error: after a
    # Redis restart every pooled connection is stale, and its first command would fail the request.
    return Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=10,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )


def _history_store(settings: Settings, redis: Any) -> HistoryStore:
    ttl = settings.history.ttl_days * 86_400 or None
    if redis is not None:
        return RedisStore(redis, ttl_seconds=ttl, max_items=settings.history.max_items)
    return MemoryStore(ttl_seconds=ttl, max_items=settings.history.max_items)


class _CountedKeyStore(RedisKeyStore):
    """Counts the key lookups Redis failed, for ``gateway_redis_errors_total{component="auth"}``."""

    redis_errors = 0

    async def by_hash(self, digest: str) -> Any:
        try:
            return await super().by_hash(digest)
        except StoreUnavailable:
            self.redis_errors += 1
            raise


def _access(state: State, settings: Settings) -> None:
    """Keys, limits and usage: in Redis when there is one, so they hold across replicas."""
    redis = state.redis
    state.auth = Authenticator(settings, _CountedKeyStore(redis) if redis is not None else MemoryKeyStore())
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


def _generations(settings: Settings, redis: Any) -> Generations:
    options = settings.resumable
    events = (
        RedisLog(redis, ttl=options.ttl, max_events=options.max_events) if redis is not None else MemoryLog(options.ttl)
    )
    return Generations(events, redis, idle=settings.timeouts.idle)


def create_app(
    settings: Settings,
    *,
    http: httpx.AsyncClient | None = None,
    redis: Any = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Litestar:
    """The gateway as an ASGI app. ``http`` and ``redis``, when given, are used as they are and left
    open: whoever made them closes them. ``metrics`` defaults to a registry of the app's own, and
    ``tracing`` to off."""
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    tracing = tracing if tracing is not None else Tracing(None)

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
                tracing.instrument_http(backend.client)
            app.state.redis = redis
            if redis is None and settings.redis.url:
                app.state.redis = _redis_client(settings.redis.url)
                stack.push_async_callback(app.state.redis.aclose)
            tracing.instrument_redis(app.state.redis)
            app.state.history = history = History(_history_store(settings, app.state.redis), settings.history)
            _access(app.state, settings)
            app.state.generations = generations = _generations(settings, app.state.redis)
            await discover_all(backends, timeout=settings.timeouts.connect)
            tasks = [
                asyncio.create_task(discover_forever(backends, settings.discovery.interval, settings.timeouts.connect)),
                asyncio.create_task(history.run()),
                asyncio.create_task(check_forever(backends, settings.health.interval, settings.timeouts.connect)),
                asyncio.create_task(generations.listen()),
                *([asyncio.create_task(app.state.usage.run())] if isinstance(app.state.usage, RedisUsage) else []),
            ]
            if metrics.multiprocess_dir is not None:
                tasks.append(asyncio.create_task(metrics.sample_forever(app.state)))
                stack.callback(metrics.process_exited)
            for task in tasks:
                stack.callback(task.cancel)
            # Runs first on the way out: records of the last replies get written before the writer stops.
            stack.push_async_callback(history.drain, _HISTORY_DRAIN_SECONDS)
            if isinstance(app.state.usage, RedisUsage):
                stack.push_async_callback(app.state.usage.flush)
            if isinstance(app.state.limiter, RedisLimiter):
                stack.push_async_callback(app.state.limiter.drain)  # the last replies' settlements
            # ... and before that, resumable generations get the grace period; then they stop, readable.
            stack.push_async_callback(generations.shutdown, settings.shutdown.grace_period)
            # What start-up built lives as long as the app: keep it out of every collection, so a
            # full collection walks only what requests allocate (pauses of 50-200 ms otherwise).
            gc.freeze()
            yield

    cors = settings.server.cors_origins
    app = Litestar(
        route_handlers=[
            Router(
                path=_API,
                route_handlers=[*api.handlers, *history_api.handlers, *resumable.handlers, websocket.chat_socket],
                before_request=authenticate_request,
            ),
            Router(path="/", route_handlers=[api.legacy_chat], before_request=authenticate_request),
            admin_api.router,
            playground,
            probes.health,
            probes.ready,
            scrape,
        ],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        request_max_body_size=settings.server.max_body_size,
        cors_config=CORSConfig(allow_origins=cors, expose_headers=["x-request-id"]) if cors else None,
        openapi_config=None,
        # The CLI configures logging; Litestar's default config would replace it.
        logging_config=None,
        state=AppState(
            {
                "settings": settings,
                "started_at": int(time.time()),
                "redis": None,
                "backends": [],
                "fallbacks": {model.name: model.fallbacks for model in settings.models},
                # Set on SIGTERM: /ready answers 503 while in-flight requests finish.
                "draining": False,
                "metrics": metrics,
                "tracing": tracing,
            }
        ),
    )
    if not cors:
        app.asgi_handler = api.Dispatch(app.asgi_handler, _API)
    # Around Litestar's whole handler, routing included, so 404s are counted and logged too.
    app.asgi_handler = observer = Observer(app.asgi_handler, metrics, tracing, log_bodies=settings.logging.log_bodies)
    app.state.observer = observer  # the WebSocket route reports each of its requests through it
    return app
