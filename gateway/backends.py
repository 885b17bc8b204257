"""Backends: the servers that answer model requests, what the gateway knows of their health, and how
it learns what they serve.

Health has two sources. Active checks run in the background, per kind (vLLM ``GET /health``, Ollama
``GET /api/version``, other OpenAI-compatible servers ``GET /models``; the mock is always healthy),
and set ``up``. Passive checks are a circuit breaker fed by real requests: ``failure_threshold``
failures in a row (connect errors, 5xx, timeouts) eject the backend for ``cooldown`` seconds, after
which a single trial request is let through; its success closes the breaker, its failure ejects the
backend again.

A backend of kind ``vllm``, ``ollama`` or ``openai`` is reached over HTTP through the app's shared
client; a ``mock`` backend gets a client of its own whose transport is the built-in model
(:mod:`gateway.mock`), so every kind goes through the same upstream and relay code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import httpx
import msgspec

from gateway.mock import MockModelTransport
from gateway.settings import BackendSettings, Settings, TimeoutSettings

__all__ = ["Backend", "build_backends", "check", "check_forever", "discover", "discover_all", "discover_forever"]

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
        "_heads",
        "_timeouts",
        "_urls",
        "base_url",
        "client",
        "discovers",
        "ejected_until",
        "ejections",
        "failures",
        "header_list",
        "headers",
        "in_flight",
        "kind",
        "models",
        "name",
        "origin",
        "patterns",
        "reason",
        "settings",
        "stream_timeout",
        "trial",
        "unary_timeout",
        "up",
        "weight",
    )

    def __init__(
        self, settings: BackendSettings, client: httpx.AsyncClient, timeouts: TimeoutSettings | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.kind = settings.kind
        self.weight = settings.weight
        self.client = client
        self.base_url = (settings.base_url or f"http://{settings.name}.mock/v1").rstrip("/")
        self.headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # The fixed part of every upstream request's headers, encoded once.
        self.header_list: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")] + [
            (name.encode(), value.encode()) for name, value in self.headers.items()
        ]
        self._urls: dict[str, httpx.URL] = {}
        self._heads: dict[str, bytes] = {}
        base = httpx.URL(self.base_url)
        self.origin = (base.raw_scheme, base.host, base.port or (443 if base.scheme == "https" else 80))
        defaults = timeouts or TimeoutSettings()
        self.timeouts = settings.timeouts.over(defaults) if settings.timeouts else defaults
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
        # The circuit breaker.
        self.failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.trial = False

    @property
    def timeouts(self) -> TimeoutSettings:
        return self._timeouts

    @timeouts.setter
    def timeouts(self, timeouts: TimeoutSettings) -> None:
        self._timeouts = timeouts
        # httpx's read timeout bounds every single read: between two stream events that is the idle
        # timeout; a non-streamed reply comes whole once the model has finished, so there the total.
        self.stream_timeout = httpx.Timeout(
            connect=timeouts.connect, read=timeouts.idle, write=timeouts.idle, pool=timeouts.connect
        )
        self.unary_timeout = httpx.Timeout(
            connect=timeouts.connect, read=timeouts.total, write=timeouts.idle, pool=timeouts.connect
        )

    def url(self, path: str) -> httpx.URL:
        """``base_url + path``, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    def request_head(self, path: str) -> bytes:
        """The request line and fixed headers of a POST to ``base_url + path``, encoded once: the
        caller adds the per-request headers, the blank line and the body."""
        head = self._heads.get(path)
        if head is None:
            url = self.url(path)
            host = url.netloc
            lines = [b"POST %s HTTP/1.1\r\n" % url.raw_path, b"host: %s\r\n" % host]
            lines += [b"%s: %s\r\n" % pair for pair in self.header_list]
            head = self._heads[path] = b"".join(lines)
        return head

    def available(self, now: float) -> bool:
        """Up, and not ejected; past its cooldown, an ejected backend is available for one trial."""
        if not self.up:
            return False
        if self.ejected_until == 0.0:
            return True
        return now >= self.ejected_until and not self.trial

    @property
    def state(self) -> str:
        if not self.up:
            return "down"
        if self.ejected_until:
            return "ejected" if time.monotonic() < self.ejected_until else "half-open"
        return "up"

    def succeeded(self) -> None:
        if self.ejected_until:
            log.info("backend %s is back after a successful trial request", self.name)
        self.failures = 0
        self.ejected_until = 0.0
        self.trial = False

    def failed(self, reason: str, threshold: int, cooldown: float) -> None:
        self.failures += 1
        half_open = self.ejected_until != 0.0
        self.trial = False
        if half_open or self.failures >= threshold:
            if not half_open or time.monotonic() >= self.ejected_until:
                self.ejections += 1
                log.warning(
                    "backend %s ejected for %g s after %d failure(s): %s", self.name, cooldown, self.failures, reason
                )
            self.ejected_until = time.monotonic() + cooldown
            self.reason = f"ejected: {reason}"

    def mark_down(self, reason: str) -> None:
        if self.up or self.reason != reason:
            log.warning("backend %s is down: %s", self.name, reason)
        self.up = False
        self.reason = reason

    def mark_up(self) -> None:
        if not self.up:
            log.info("backend %s is up", self.name)
        self.up = True
        if not self.ejected_until:
            self.reason = None

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, kind={self.kind!r}, state={self.state!r})"


def build_backends(settings: Settings, http: httpx.AsyncClient) -> list[Backend]:
    backends = []
    for backend_settings in settings.backends:
        if backend_settings.kind == "mock":
            client = httpx.AsyncClient(transport=MockModelTransport(backend_settings), timeout=None)
        else:
            client = http
        backends.append(Backend(backend_settings, client, settings.timeouts))
    return backends


def _probe_url(backend: Backend) -> str:
    root = backend.base_url.removesuffix("/v1")
    if backend.kind == "vllm":
        return f"{root}/health"
    if backend.kind == "ollama":
        return f"{root}/api/version"
    return f"{backend.base_url}/models"


async def check(backend: Backend, timeout: float) -> None:
    """One active health check. A backend that discovers its models is also checked by discovery;
    it comes up here only once it knows some."""
    if backend.kind == "mock":
        return
    try:
        response = await backend.client.get(_probe_url(backend), headers=backend.headers, timeout=timeout)
        ok = response.status_code < 400
        reason = f"health check answered {response.status_code}"
    except httpx.HTTPError as exc:
        ok, reason = False, f"health check failed: {_describe(exc)}"
    if not ok:
        backend.mark_down(reason)
    elif backend.models or backend.patterns:
        backend.mark_up()


async def check_forever(backends: list[Backend], interval: float, timeout: float) -> None:
    """The active health checks the app's lifespan runs."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(check(backend, timeout) for backend in backends))


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
