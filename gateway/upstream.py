"""Sending one request to one backend, and turning its answer into a response or an error.

The body is sent as the client wrote it (after the rewrites the handler chose). An error status is
read whole and raised as :class:`~gateway.errors.UpstreamStatus`, before anything reaches the client;
a success is returned unread, for the caller to relay.
"""

from __future__ import annotations

import httpx

from gateway.backends import Backend
from gateway.errors import UpstreamStatus, upstream_errors
from gateway.settings import TimeoutSettings

__all__ = ["open_response", "upstream_timeout"]

# Headers of an upstream error worth passing on: the SDK's backoff reads them.
_PASSED_ON_ERROR = ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


def upstream_timeout(timeouts: TimeoutSettings, *, stream: bool) -> httpx.Timeout:
    """httpx's read timeout bounds every single read: between two stream events that is the idle
    timeout; for a non-streamed reply, which comes whole after the model has finished, the total."""
    return httpx.Timeout(
        connect=timeouts.connect,
        read=timeouts.idle if stream else timeouts.total,
        write=timeouts.idle,
        pool=timeouts.connect,
    )


async def open_response(
    backend: Backend,
    path: str,
    body: bytes,
    *,
    request_id: str,
    stream: bool,
    timeout: httpx.Timeout,
) -> httpx.Response:
    headers = {
        **backend.headers,
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "x-request-id": request_id,
    }
    request = backend.client.build_request(
        "POST", backend.base_url + path, content=body, headers=headers, timeout=timeout
    )
    with upstream_errors(backend.name):
        response = await backend.client.send(request, stream=True)
        if response.status_code >= 400:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            passed = {name: response.headers[name] for name in _PASSED_ON_ERROR if name in response.headers}
            raise UpstreamStatus(backend.name, response.status_code, content, passed)
    return response
