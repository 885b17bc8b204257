"""What every request leaves behind once it is complete: its metrics, one access line, its span.

One ASGI wrapper around the whole app sees every HTTP request, 404s and errors included (Litestar's own
middleware runs after routing, so it never sees a path that matched nothing), and gives each response
its ``x-request-id``. It notes when the request arrived, its status, and when its last byte went out;
it reports when the app returns, which is after the response's background work, so a stream's reply
(tokens, time to first token, gaps) is complete by then and observed once. What the request was
about comes from ``scope["state"]``: ``principal`` and ``tenant`` (authentication), and ``model``,
``backend``, ``reply``, ``stream`` and ``user`` (the API handlers). Requests over the WebSocket route
are reported one by one by that route, through :meth:`Observer.report`.

The access line names the key (never its secret) and holds no message content, unless
``[logging] log_bodies = true`` adds the request body and the reply's message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import Metrics
from gateway.reply import Reply
from gateway.request import header, request_id
from gateway.tracing import Tracing

__all__ = ["Observer"]

access = logging.getLogger("gateway.access")
log = logging.getLogger("gateway.observe")

# Probes and scrapes come every few seconds: their access lines are DEBUG while they succeed.
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
_BODY_LOG_LIMIT = 64 * 1024
_CLIENT_GONE = 499
"""The status reported when the client left before any response started (nginx's convention)."""


class Observer:
    __slots__ = ("_app", "_log_bodies", "_metrics", "_tracing")

    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing, *, log_bodies: bool = False) -> None:
        self._app = app
        self._metrics = metrics
        self._tracing = tracing
        self._log_bodies = log_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        metrics = self._metrics
        metrics.request_started()
        span = self._tracing.start_request(scope) if self._tracing.tracer is not None else None
        status = 0
        finished = 0.0
        streaming = False

        # A plain function handing back the server's own awaitable: every note is taken before the
        # message is sent, and a coroutine of its own would be entered and left for every streamed
        # event.
        def observed_send(message: Message) -> Awaitable[None]:
            nonlocal status, finished, streaming
            if message.get("more_body"):
                return send(message)  # a stream's event: nothing to note
            if message["type"] == "http.response.start":
                # Every response carries the request's id, errors and 404s included.
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id(scope).encode())]
                status = message["status"]
                if status == 200 and scope["state"].get("stream"):
                    streaming = True
                    metrics.stream_opened()
            elif message["type"] == "http.response.body":
                finished = time.perf_counter()
                if streaming:
                    streaming = False
                    metrics.stream_closed()
            return send(message)

        body: list[bytes] | None = None
        if self._log_bodies:
            receive = _recorded(receive, body := [])
        try:
            await self._app(scope, receive, observed_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            metrics.request_ended()
            if streaming:
                metrics.stream_closed()
            duration = (finished or time.perf_counter()) - started
            self._report(scope, status or _CLIENT_GONE, duration, span, body)

    def report(self, scope: Scope, status: int, duration: float, body: bytes | None = None) -> None:
        """One request that did not come as its own HTTP request (a WebSocket's): ``scope`` as an HTTP
        request's would be (``method``, ``path``, ``path_template``, ``state``)."""
        self._report(scope, status, duration, None, [body] if body is not None and self._log_bodies else None)

    def _report(self, scope: Scope, status: int, duration: float, span: Any, body: list[bytes] | None) -> None:
        route = scope.get("path_template") or "unmatched"
        state = scope["state"]
        reply: Reply | None = state.get("reply")
        principal = state.get("principal")
        key = principal.name if principal is not None else ""
        model = state.get("model", "")
        backend = (reply.backend if reply is not None else None) or state.get("backend", "")
        usage = reply.usage if reply is not None else None
        try:
            self._metrics.request_done(route, status, duration, model=model, backend=backend, key=key, reply=reply)
            level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
            if not access.isEnabledFor(level):
                return
            fields: dict[str, Any] = {
                "request_id": request_id(scope),
                "key": key or None,
                "tenant": state.get("tenant"),
                "user": state.get("user") or header(scope, b"x-user-id"),
                "model": model or None,
                "backend": backend or None,
                "status": status,
                "prompt_tokens": usage.prompt_tokens if usage is not None else None,
                "completion_tokens": usage.completion_tokens if usage is not None else None,
                "ttft_ms": _ms(reply.first_token) if reply is not None and reply.first_token is not None else None,
                "duration_ms": _ms(duration),
                "retries": reply.retries if reply is not None else 0,
                "method": scope["method"],
                "path": scope["path"],
            }
            if body is not None:
                fields["request_body"] = b"".join(body)[:_BODY_LOG_LIMIT].decode("utf-8", "replace")
                fields["reply"] = reply.message() if reply is not None else None
            access.log(level, "%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})
        except Exception:
            log.exception("could not report request %s", request_id(scope))
        finally:
            if span is not None:
                attributes = {
                    "gateway.request_id": request_id(scope),
                    "gateway.key": key,
                    "gen_ai.request.model": model,
                    "gateway.backend": backend,
                    "gen_ai.usage.input_tokens": usage.prompt_tokens if usage is not None else None,
                    "gen_ai.usage.output_tokens": usage.completion_tokens if usage is not None else None,
                }
                self._tracing.end_request(span, route=route, status=status, attributes=attributes)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _recorded(receive: Receive, into: list[bytes]) -> Receive:
    """``receive``, keeping the request body's first bytes for the access line."""
    size = 0

    async def recording() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request" and size < _BODY_LOG_LIMIT:
            chunk = message.get("body", b"")
            into.append(chunk)
            size += len(chunk)
        return message

    return recording
