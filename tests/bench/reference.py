"""Two minimal relays, measured by the ``reference`` points next to the gateway: what the stack
costs before the gateway does any work of its own.

    python -m tests.bench.reference {litestar,litestar-asgi,asgi} --port P --upstream URL

Both forward ``POST /v1/chat/completions`` to the upstream through the gateway's transport (the
request's bytes built as the gateway builds them) and relay the answer: a non-streamed body whole, a
stream's bytes as they arrive. No auth, limits, routing, history, metrics, logs, SSE parsing or error
handling. Both run on uvicorn with uvloop and httptools, one worker, as ``gateway serve`` does.

- ``litestar``: one Litestar route handler returning ``Response`` or ``Stream``;
- ``litestar-asgi``: Litestar routing to an ``@asgi`` route, which runs ``asgi``'s callable;
- ``asgi``: a bare ASGI callable, no framework.

The gateway can be no cheaper than ``litestar``; ``litestar-asgi`` shows what serving the hot routes
as Litestar ASGI routes would buy, ``asgi`` what leaving the framework would.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, Request, Response, asgi, get, post
from litestar.response import Stream
from litestar.types import Receive, Scope, Send

from gateway.transport import Transport

__all__ = ["RELAYS", "asgi_app", "litestar_app", "litestar_asgi_app"]

_TIMEOUTS = {"connect": 5.0, "read": 60.0, "pool": 5.0}


class _Upstream:
    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url + "/chat/completions")
        self.origin = (url.raw_scheme, url.host, url.port or 80)
        self.head = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n" % (url.raw_path, url.netloc)
        self.transport = Transport()

    async def send(self, body: bytes, stream: bool) -> httpx.Response:
        data = b"%saccept: %s\r\ncontent-length: %d\r\n\r\n%s" % (
            self.head,
            b"text/event-stream" if stream else b"application/json",
            len(body),
            body,
        )
        return await self.transport.send(self.origin, data, _TIMEOUTS, read=not stream)


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            yield chunk
    finally:
        await response.aclose()


def _wants_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


def litestar_app(upstream_url: str) -> Litestar:
    upstream = _Upstream(upstream_url)

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request) -> Response[bytes] | Stream:
        body = await request.body()
        stream = _wants_stream(body)
        response = await upstream.send(body, stream)
        if not stream:
            return Response(response.content, status_code=response.status_code, media_type="application/json")
        return Stream(_chunks(response), status_code=response.status_code, media_type="text/event-stream")

    @get("/health")
    async def health() -> dict[str, str]:
        return {}

    return Litestar([chat, health], openapi_config=None, logging_config=None)


def litestar_asgi_app(upstream_url: str) -> Litestar:
    relay = asgi_app(upstream_url)

    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        await relay(scope, receive, send)

    @get("/health")
    async def health() -> dict[str, str]:
        return {}

    return Litestar([asgi("/v1/chat/completions")(chat), health], openapi_config=None, logging_config=None)


def asgi_app(upstream_url: str) -> Any:
    upstream = _Upstream(upstream_url)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        stream = _wants_stream(body)
        response = await upstream.send(body, stream)
        media = b"text/event-stream" if stream else b"application/json"
        headers = [(b"content-type", media)]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        if not stream:
            await send({"type": "http.response.body", "body": response.content})
            return
        async for chunk in _chunks(response):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


RELAYS = {"litestar": litestar_app, "litestar-asgi": litestar_asgi_app, "asgi": asgi_app}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=tuple(RELAYS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, ending in /v1")
    args = parser.parse_args()
    app = RELAYS[args.kind](args.upstream)
    gc.set_threshold(10_000, 20, 50)  # as gateway serve does
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
