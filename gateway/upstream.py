"""Sending one request to one backend, and turning its answer into a response or an error.

The body is sent as the client wrote it (after the rewrites the handler chose). An error status is
read whole and raised as :class:`~gateway.errors.UpstreamStatus`, before anything reaches the client;
a success is returned for the caller to relay: a stream unread, a non-streamed answer read whole.

Over the gateway's own transport (gateway/transport.py), the request's bytes are built here, from a
head encoded once per backend and path; an ``httpx.Request`` would cost a fifth of the call. Over any
other transport (the mock backend, a test's), or when request hooks must see the request (tracing adds
``traceparent``), an ``httpx.Request`` goes straight to the transport: ``AsyncClient.send`` would merge
cookies, auth and default headers and check redirects on every call, for nothing, since the gateway
sets every header it sends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from gateway.backends import Backend
from gateway.deadline import Deadline
from gateway.errors import UpstreamStatus, upstream_errors
from gateway.transport import Transport

__all__ = ["direct_transport", "open_response"]

# Headers of an upstream error worth passing on: the SDK's backoff reads them.
_PASSED_ON_ERROR = ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")

_FIND: Any = object()


async def open_response(
    backend: Backend,
    path: str,
    body: bytes,
    *,
    request_id: str,
    stream: bool,
    timeout: httpx.Timeout,
    total: float | None = None,
    direct: Transport | None = _FIND,
) -> httpx.Response:
    """The backend's response to ``body`` sent to ``path``: once its headers are in, for a stream;
    read whole, for the rest, within ``total`` seconds (else :class:`~gateway.errors.UpstreamTimeout`).
    For a stream, over a :func:`direct_transport`, ``total`` bounds the wait for its headers and first body
    bytes (:class:`~gateway.transport.FirstByteTimeout`, as the ``UpstreamTimeout``'s cause);
    otherwise the caller keeps that deadline. ``direct``: :func:`direct_transport`'s answer, from a
    caller that needed it first."""
    client = backend.client
    accept = b"text/event-stream" if stream else b"application/json"
    rid = request_id.encode()
    with upstream_errors(backend.name):
        transport = direct_transport(backend) if direct is _FIND else direct
        if transport is not None:
            data = b"%saccept: %s\r\nx-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (
                backend.request_head(path),
                accept,
                rid,
                len(body),
                body,
            )
            response = await transport.send(backend.origin, data, timeout.as_dict(), read=not stream, total=total)
        else:
            other = client._transport
            headers = [*backend.header_list, (b"accept", accept), (b"x-request-id", rid)]
            request = httpx.Request(
                "POST", backend.url(path), content=body, headers=headers, extensions={"timeout": timeout.as_dict()}
            )
            for hook in client.event_hooks["request"]:
                await hook(request)
            if stream:
                response = await other.handle_async_request(request)  # total: the caller's
            else:
                response = await _read_whole(other, request, total)
            response.request = request
        if response.status_code >= 400:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            passed = {name: response.headers[name] for name in _PASSED_ON_ERROR if name in response.headers}
            raise UpstreamStatus(backend.name, response.status_code, content, passed)
    return response


def direct_transport(backend: Backend) -> Transport | None:
    """The gateway's transport, when a request to ``backend`` goes out over it as bytes built here;
    None when an ``httpx.Request`` must be built (another transport, or request hooks to run)."""
    client = backend.client
    transport = client._transport
    return transport if isinstance(transport, Transport) and not client.event_hooks["request"] else None


async def _read_whole(
    transport: httpx.AsyncBaseTransport, request: httpx.Request, total: float | None
) -> httpx.Response:
    try:
        with Deadline(total) if total is not None else contextlib.nullcontext():
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
    except TimeoutError:
        raise httpx.ReadTimeout(f"The upstream did not answer within {total:g} s.") from None
    return response
