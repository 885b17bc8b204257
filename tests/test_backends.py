"""The circuit breaker and the active health checks of one backend."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from pytest_httpx import HTTPXMock

from gateway.backends import Backend, check
from gateway.errors import NoBackendAvailable
from gateway.routing import resolve
from gateway.settings import BackendSettings


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


def make(client: httpx.AsyncClient, kind: str = "vllm", models: list[str] | None = None) -> Backend:
    return Backend(
        BackendSettings(
            name="b",
            kind=kind,
            base_url="http://b:8000/v1",  # type: ignore[arg-type]
            models=models if models is not None else ["m"],
        ),
        client,
    )


def test_breaker_ejects_after_the_threshold_then_lets_one_trial_through(client: httpx.AsyncClient) -> None:
    backend = make(client)
    for _ in range(2):
        backend.failed("boom", threshold=3, cooldown=0.2)
    assert backend.available(time.monotonic()) and backend.ejections == 0
    backend.failed("boom", threshold=3, cooldown=0.2)
    assert not backend.available(time.monotonic()) and backend.state == "ejected" and backend.ejections == 1
    with pytest.raises(NoBackendAvailable, match="ejected"):
        resolve("m", [backend], {})
    time.sleep(0.25)
    assert backend.state == "half-open" and backend.available(time.monotonic())
    backend.trial = True  # one request is trying it
    assert not backend.available(time.monotonic())
    backend.failed("still broken", threshold=3, cooldown=0.2)  # the trial failed: ejected again
    assert backend.state == "ejected" and backend.ejections == 2
    time.sleep(0.25)
    backend.succeeded()  # the next trial succeeded
    assert backend.state == "up" and backend.failures == 0 and backend.available(time.monotonic())


def test_a_success_resets_the_count(client: httpx.AsyncClient) -> None:
    backend = make(client)
    backend.failed("x", threshold=3, cooldown=1)
    backend.failed("x", threshold=3, cooldown=1)
    backend.succeeded()
    backend.failed("x", threshold=3, cooldown=1)
    assert backend.state == "up"


@pytest.mark.parametrize(
    ("kind", "url"),
    [("vllm", "http://b:8000/health"), ("ollama", "http://b:8000/api/version"), ("openai", "http://b:8000/v1/models")],
)
async def test_active_check_per_kind(httpx_mock: HTTPXMock, client: httpx.AsyncClient, kind: str, url: str) -> None:
    backend = make(client, kind)
    httpx_mock.add_response(url=url, status_code=500)
    await check(backend, timeout=1)
    assert backend.state == "down" and "500" in (backend.reason or "")
    httpx_mock.add_response(url=url)
    await check(backend, timeout=1)
    assert backend.state == "up"


async def test_mock_needs_no_check(client: httpx.AsyncClient) -> None:
    backend = make(client, "mock")
    await check(backend, timeout=1)
    assert backend.state == "up"


def test_per_backend_timeouts_override_the_defaults(client: httpx.AsyncClient) -> None:
    from gateway.settings import TimeoutOverrides, TimeoutSettings

    settings = BackendSettings(name="b", kind="vllm", base_url="http://b/v1", timeouts=TimeoutOverrides(idle=5))
    backend = Backend(settings, client, TimeoutSettings(first_token=9))
    assert (backend.timeouts.idle, backend.timeouts.first_token) == (5, 9)
