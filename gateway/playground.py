"""``GET /``: the playground, one static page (no build step, no CDN) to try a model in a browser."""

from __future__ import annotations

from importlib import resources

from litestar import Response, get

__all__ = ["playground"]


@get("/", include_in_schema=False)
async def playground() -> Response[bytes]:
    return Response(_page(), media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


def _page() -> bytes:
    return resources.files("gateway").joinpath("static/playground.html").read_bytes()
