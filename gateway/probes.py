"""Kubernetes probes. ``/health`` says the process answers and checks nothing else, so a slow
dependency never gets a healthy pod restarted; ``/ready`` says whether this replica can serve."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar import Response, get
from litestar.datastructures import State

from gateway.wire import encode

__all__ = ["health", "ready"]

_REDIS_PING_TIMEOUT = 0.5


@get("/health")
async def health() -> Response[bytes]:
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/ready")
async def ready(state: State) -> Response[bytes]:
    backends: dict[str, Any] = {}
    for backend in state.backends:
        entry: dict[str, Any] = {
            "state": backend.state,
            "kind": backend.kind,
            "models": len(backend.models) + len(backend.patterns),
            "in_flight": backend.in_flight,
        }
        if backend.reason:
            entry["reason"] = backend.reason
        backends[backend.name] = entry
    components: dict[str, Any] = {"backends": backends}
    now = time.monotonic()
    # An ejected backend can serve again once its cooldown is over; until then it cannot.
    serving = not state.draining and any(backend.up and now >= backend.ejected_until for backend in state.backends)
    history = state.history
    components["history"] = {
        "store": "redis" if state.redis is not None else "memory",
        "queued": history.queued,
        "dropped": history.dropped,
    }
    limiter_degraded = getattr(state.limiter, "degraded", None)
    components["limits"] = {"state": "degraded", "reason": limiter_degraded} if limiter_degraded else {"state": "up"}
    if state.redis is not None:
        redis_state = components["redis"] = await _redis_state(state.redis)
        if redis_state["state"] != "up" and state.settings.health.require_redis:
            serving = False
    status = "draining" if state.draining else "ready" if serving else "unavailable"
    body = {"status": status, "components": components}
    return Response(encode(body), status_code=200 if serving else 503, media_type="application/json")


async def _redis_state(redis: Any) -> dict[str, str]:
    # A Redis outage degrades this replica but does not take it out of rotation: every replica
    # shares the Redis, so failing them all would turn a Redis blip into a full outage.
    try:
        async with asyncio.timeout(_REDIS_PING_TIMEOUT):
            await redis.ping()
    except Exception as exc:
        return {"state": "degraded", "reason": str(exc) or type(exc).__name__}
    return {"state": "up"}
