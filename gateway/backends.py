"""Backends: the servers that answer model requests, and how the gateway learns what they serve.

A backend of kind ``vllm``, ``ollama`` or ``openai`` is reached over HTTP through the app's shared
client; a ``mock`` backend gets a client of its own whose transport is the built-in model
(:mod:`gateway.mock`), so every kind goes through the same upstream and relay code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import httpx
import msgspec

from gateway.mock import MockModelTransport
from gateway.settings import BackendSettings, Settings

__all__ = ["Backend", "build_backends", "discover", "discover_forever"]

log = logging.getLogger("gateway.backends")

_PATTERN_CHARS = frozenset("*?[")


class _ModelsPage(msgspec.Struct):
    class _Card(msgspec.Struct):
        id: str

    data: list[_Card]


_models_decoder = msgspec.json.Decoder(_ModelsPage)


class Backend:
    """One upstream server and what the gateway currently knows of it."""

    __slots__ = (
        "base_url",
        "client",
        "discovers",
        "headers",
        "in_flight",
        "kind",
        "models",
        "name",
        "patterns",
        "reason",
        "settings",
        "up",
        "weight",
    )

    def __init__(self, settings: BackendSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.name = settings.name
        self.kind = settings.kind
        self.weight = settings.weight
        self.client = client
        self.base_url = (settings.base_url or f"http://{settings.name}.mock/v1").rstrip("/")
        self.headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        configured = settings.models
        if configured is None and settings.kind == "mock":
            configured = ["mock"]
        self.discovers = configured is None
        names = configured or []
        self.models: frozenset[str] = frozenset(m for m in names if not _PATTERN_CHARS & set(m))
        # Longest first: "gpt-4o*" is more specific than "*".
        self.patterns: tuple[str, ...] = tuple(
            sorted((m for m in names if _PATTERN_CHARS & set(m)), key=len, reverse=True)
        )
        self.in_flight = 0
        # A backend that discovers its models is down until the first discovery succeeds.
        self.up = not self.discovers
        self.reason: str | None = "models not discovered yet" if self.discovers else None

    def mark_down(self, reason: str) -> None:
        if self.up or self.reason != reason:
            log.warning("backend %s is down: %s", self.name, reason)
        self.up = False
        self.reason = reason

    def mark_up(self) -> None:
        if not self.up:
            log.info("backend %s is up", self.name)
        self.up = True
        self.reason = None

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, kind={self.kind!r}, up={self.up})"


def build_backends(settings: Settings, http: httpx.AsyncClient) -> list[Backend]:
    backends = []
    for backend_settings in settings.backends:
        if backend_settings.kind == "mock":
            client = httpx.AsyncClient(transport=MockModelTransport(backend_settings), timeout=None)
        else:
            client = http
        backends.append(Backend(backend_settings, client))
    return backends


async def discover(backend: Backend, timeout: float) -> bool:
    """Refresh ``backend.models`` from ``GET {base_url}/models``. Returns whether the set changed."""
    try:
        response = await backend.client.get(f"{backend.base_url}/models", headers=backend.headers, timeout=timeout)
        if response.status_code != 200:
            raise ValueError(f"GET /models answered {response.status_code}")
        page = _models_decoder.decode(response.content)
    except (httpx.HTTPError, ValueError, msgspec.DecodeError) as exc:
        backend.mark_down(f"model discovery failed: {_describe(exc)}")
        return False
    models = frozenset(card.id for card in page.data)
    changed = models != backend.models
    if changed:
        log.info("backend %s serves %s", backend.name, ", ".join(sorted(models)) or "no models")
    backend.models = models
    if models:
        backend.mark_up()
    else:
        backend.mark_down("the backend lists no models")
    return changed


async def discover_all(backends: Iterable[Backend], timeout: float) -> bool:
    results = await asyncio.gather(*(discover(b, timeout) for b in backends if b.discovers))
    return any(results)


async def discover_forever(backends: list[Backend], interval: float, timeout: float) -> None:
    """The refresh loop the app's lifespan runs for backends without a ``models`` list."""
    while True:
        await asyncio.sleep(interval)
        await discover_all(backends, timeout)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
