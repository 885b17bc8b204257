"""Prometheus metrics: /metrics scraped before and after requests flow, in-process (Litestar's test
client) and from real gateway processes, one worker and two."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpx import HTTPXMock

from gateway import metrics as metrics_module
from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.reply import Reply
from gateway.settings import BackendSettings, HistorySettings, KeySettings, RedisSettings, Settings
from gateway.wire import Usage
from tests.conftest import GatewayFactory, Upstream, free_port

CHAT = "/v1/chat/completions"
UP = "http://upstream/v1"
MESSAGES = [{"role": "user", "content": "hello gateway"}]


class Scrape:
    """One scrape of /metrics, parsed: every sample by name and labels (a duplicate fails the test)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` that has ``labels`` (and any others)."""
        wanted = set(labels.items())
        return sum(value for (n, have), value in self.samples.items() if n == name and wanted <= have)


async def until(scrape: Callable[[], Awaitable[Scrape]], check: Callable[[Scrape], bool], timeout: float = 5) -> Scrape:
    """Scrape until ``check`` holds: a request is observed just after its last byte went out."""
    deadline = time.monotonic() + timeout
    while True:
        result = await scrape()
        if check(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        backends=[
            BackendSettings(name="mock", kind="mock", models=["mock"]),
            BackendSettings(name="up", kind="vllm", base_url=UP, models=["up-model"]),
        ]
    )
    return Settings(**(base | overrides))


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    async with httpx.AsyncClient() as http, AsyncTestClient(app=create_app(settings(), http=http)) as test_client:
        yield test_client


async def scrape(client: AsyncTestClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


async def test_requests_observed_with_route_model_backend_status(client: AsyncTestClient) -> None:
    before = await scrape(client)
    assert (await client.post(CHAT, json={"model": "mock", "messages": MESSAGES, "max_tokens": 4})).status_code == 200
    streamed = {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": 5}
    streamed["stream_options"] = {"include_usage": True}
    async with client.stream("POST", CHAT, json=streamed) as response:
        assert response.status_code == 200
        await response.aread()
    assert (await client.get("/no/such/path")).status_code == 404
    assert (await client.post(CHAT, json={"model": "no-such-model", "messages": MESSAGES})).status_code == 404
    after = await until(
        lambda: scrape(client),
        lambda s: s.get("gateway_requests_total", route=CHAT, model="", backend="", status="404") >= 1,
    )

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    mock = {"model": "mock", "backend": "mock"}
    assert delta("gateway_requests_total", route=CHAT, status="200", **mock) == 2
    assert delta("gateway_requests_total", route="unmatched", model="", backend="", status="404") == 1
    # An unknown model is no label value: clients would make up series without bound.
    assert delta("gateway_requests_total", route=CHAT, model="", backend="", status="404") == 1
    assert delta("gateway_requests_total", route="/metrics", model="", backend="", status="200") == 1
    assert delta("gateway_request_duration_seconds_count", route=CHAT, **mock) == 2
    assert delta("gateway_time_to_first_token_seconds_count", **mock) == 2
    assert delta("gateway_overhead_seconds_count") == 2
    assert delta("gateway_inter_token_seconds_count", model="mock") >= 4  # 5 tokens streamed
    assert delta("gateway_tokens_total", model="mock", key="open", type="completion") == 4 + 5
    assert delta("gateway_tokens_total", model="mock", key="open", type="prompt") > 0
    assert after.get("gateway_in_flight_requests") == 1  # the scrape itself
    assert after.get("gateway_open_streams") == 0
    assert after.get("gateway_backend_healthy", backend="mock") == 1
    assert after.get("gateway_history_queue") == 0


async def test_routes_are_templates_not_paths(client: AsyncTestClient) -> None:
    assert (await client.get("/v1/models/mock")).status_code == 200
    assert (await client.get("/v1/chat/completions/chatcmpl-nope")).status_code == 404
    assert (await client.get(CHAT)).status_code == 200  # history: the stored completions
    after = await scrape(client)
    routes = {dict(labels)["route"] for (name, labels) in after.samples if name == "gateway_requests_total"}
    assert "/v1/models/{model_id}" in routes
    assert any(r.startswith("/v1/chat/completions/{") for r in routes), routes
    assert not any("chatcmpl-nope" in r or r == "/v1/models/mock" for r in routes)


async def test_rate_limit_rejections_and_unauthenticated_requests_counted() -> None:
    keys = [KeySettings(name="team", key="sk-team-0123456789", rpm=1)]
    async with AsyncTestClient(app=create_app(settings(keys=keys))) as client:
        headers = {"authorization": "Bearer sk-team-0123456789"}
        body = {"model": "mock", "messages": MESSAGES, "max_tokens": 2}
        assert (await client.post(CHAT, json=body, headers=headers)).status_code == 200
        assert (await client.post(CHAT, json=body, headers=headers)).status_code == 429
        assert (await client.post(CHAT, json=body)).status_code == 401
        response = await client.get("/metrics")  # no key needed
        assert response.status_code == 200
        after = Scrape(response.text)
    assert after.get("gateway_ratelimit_rejections_total", key="team") == 1
    assert after.get("gateway_requests_total", route=CHAT, model="mock", backend="mock", status="429") == 1
    assert after.get("gateway_requests_total", route=CHAT, model="", backend="", status="401") == 1
    assert after.get("gateway_tokens_total", model="mock", key="team", type="completion") == 2


async def test_backend_healthy_follows_discovery() -> None:
    dead = BackendSettings(name="dead", kind="vllm", base_url=f"http://127.0.0.1:{free_port()}/v1")  # discovers
    async with AsyncTestClient(app=create_app(settings(backends=[*settings().backends[:1], dead]))) as client:
        after = await scrape(client)
    assert after.get("gateway_backend_healthy", backend="dead") == 0
    assert after.get("gateway_backend_healthy", backend="mock") == 1
    assert after.get("gateway_backend_ejections_total", backend="dead") == 0


async def test_history_queue_and_redis_errors_while_redis_is_down() -> None:
    down = settings(
        redis=RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"), history=HistorySettings(queue_size=2)
    )
    async with AsyncTestClient(app=create_app(down)) as client:
        for _ in range(3):
            body = {"model": "mock", "messages": MESSAGES, "max_tokens": 1}
            assert (await client.post(CHAT, json=body)).status_code == 200
        after = await until(
            lambda: scrape(client), lambda s: s.get("gateway_redis_errors_total", component="history") >= 1
        )
    assert after.get("gateway_history_queue") == 2
    assert after.get("gateway_history_dropped_total") == 1
    assert after.get("gateway_redis_errors_total", component="history") >= 1
    assert after.get("gateway_redis_errors_total", component="limits") == 0


async def test_retries_counted(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{UP}/chat/completions", status_code=500, json={"error": {"message": "boom"}})
    httpx_mock.add_response(url=f"{UP}/chat/completions", json={"id": "x", "choices": [], "usage": None})
    async with httpx.AsyncClient() as http, AsyncTestClient(app=create_app(settings(), http=http)) as client:
        response = await client.post(CHAT, json={"model": "up-model", "messages": MESSAGES})
        assert response.status_code == 200
        after = await scrape(client)
    assert after.get("gateway_retries_total", model="up-model") == 1
    assert after.get("gateway_requests_total", route=CHAT, model="up-model", backend="up", status="200") == 1


def test_label_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_MAX_LABEL_VALUES", 2)
    metrics = Metrics(CollectorRegistry())
    for model in ("a", "b", "c", "d", "a"):
        metrics.request_done("/v1/chat/completions", 200, 0.1, model=model, backend="x", key="k", reply=None)
    metrics.fold()
    assert metrics.registry is not None
    text = Scrape(generate_latest(metrics.registry).decode())
    assert text.get("gateway_requests_total", route=CHAT, model="a", backend="x", status="200") == 2
    assert text.get("gateway_requests_total", route=CHAT, model="other", backend="x", status="200") == 2


def _reply(index: int) -> Reply:
    reply = Reply()
    reply.first_token = 0.01 * index
    reply.upstream_time = 0.002 * index
    reply.gaps = [0.001 * i for i in range(index % 5)]
    reply.usage = Usage(prompt_tokens=index, completion_tokens=2 * index) if index % 3 else None
    reply.retries = index % 2
    return reply


def test_folded_requests_count_as_one_by_one_updates() -> None:
    """The batched fold gives the series and values that updating each metric per request gives."""
    folded, expected = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for index in range(300):
        status, duration, reply = 200 if index % 7 else 502, 0.003 * index, _reply(index) if index % 4 else None
        model, backend, key = f"m{index % 3}", f"b{index % 2}", f"k{index % 4}"
        folded.request_done(CHAT, status, duration, model=model, backend=backend, key=key, reply=reply)
        expected.requests.labels(CHAT, model, backend, str(status)).inc()
        expected.duration.labels(CHAT, model, backend).observe(duration)
        if reply is None or reply.first_token is None:
            continue
        expected.ttft.labels(model, backend).observe(reply.first_token)
        expected.overhead.observe(max(0.0, duration - reply.upstream_time))
        for gap in reply.gaps:
            expected.inter_token.labels(model).observe(gap)
        if reply.usage is not None:
            expected.tokens.labels(model, key, "prompt").inc(reply.usage.prompt_tokens)
            expected.tokens.labels(model, key, "completion").inc(reply.usage.completion_tokens)
        if reply.retries:
            expected.retries.labels(model).inc(reply.retries)
    folded.fold()
    assert folded.registry is not None and expected.registry is not None
    got = Scrape(generate_latest(folded.registry).decode()).samples
    want = Scrape(generate_latest(expected.registry).decode()).samples
    assert got.keys() == want.keys()
    for series, value in want.items():
        assert got[series] == pytest.approx(value), series
    names = {name for name, _ in want}
    assert {"gateway_tokens_total", "gateway_retries_total", "gateway_inter_token_seconds_bucket"} <= names


def test_requests_are_folded_without_a_scrape_past_a_batch() -> None:
    metrics = Metrics(CollectorRegistry())
    registry = metrics.registry
    assert registry is not None

    def counted() -> float:
        scraped = Scrape(generate_latest(registry).decode())
        return scraped.get("gateway_requests_total", route=CHAT, model="m", backend="b", status="200")

    for _ in range(metrics_module._FOLD_EVERY - 1):
        metrics.request_done(CHAT, 200, 0.1, model="m", backend="b", key="k", reply=None)
    assert counted() == 0  # noted, not yet folded: a scrape folds them (sample())
    metrics.request_done(CHAT, 200, 0.1, model="m", backend="b", key="k", reply=None)
    assert counted() == metrics_module._FOLD_EVERY


def test_observe_all_counts_as_observe_does() -> None:
    values = [0.0, 0.001, 0.0015, 0.02, 0.02, 0.3, 5.12, 7.0, 1e9, 0.0025]
    one_by_one, at_once = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for value in values:
        one_by_one.inter_token.labels("m").observe(value)
    metrics_module.observe_all(at_once.inter_token.labels("m"), values)
    assert one_by_one.registry is not None and at_once.registry is not None
    expected = Scrape(generate_latest(one_by_one.registry).decode()).samples
    got = Scrape(generate_latest(at_once.registry).decode()).samples
    counted = ("gateway_inter_token_seconds_bucket", "gateway_inter_token_seconds_count")
    assert {k: v for k, v in got.items() if k[0] in counted} == {k: v for k, v in expected.items() if k[0] in counted}
    assert got[("gateway_inter_token_seconds_sum", frozenset({("model", "m")}))] == pytest.approx(sum(values))
    assert len([k for k in got if k[0] == "gateway_inter_token_seconds_bucket"]) > 10


def test_each_app_has_its_own_metrics() -> None:
    first, second = create_app(settings()), create_app(settings())
    assert first.state.metrics is not second.state.metrics
    assert first.state.metrics.registry is not second.state.metrics.registry


# -- real processes ---------------------------------------------------------------------------


def gateway_config(upstream: Upstream, extra: str = "") -> str:
    return f"""
{extra}
{upstream.backend_toml()}
[[keys]]
name = "team-a"
key = "sk-team-a-0123456789"

[[keys]]
name = "limited"
key = "sk-limited-0123456789"
rpm = 1
"""


def scrape_url(url: str) -> Scrape:
    # A new connection each time: with several workers, any of them may answer.
    response = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
    assert response.status_code == 200
    return Scrape(response.text)


def scrape_until(url: str, check: Callable[[Scrape], bool], timeout: float = 5) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        result = scrape_url(url)
        if check(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_metrics_of_a_gateway_process(upstream: Upstream, start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(gateway_config(upstream))
    before = scrape_url(gateway.url)
    team = gateway.client(api_key="sk-team-a-0123456789")
    team.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    body = {
        "model": "fake-model",
        "messages": MESSAGES,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake_token_delay": 0.05,
    }
    headers = {"authorization": "Bearer sk-team-a-0123456789"}
    url = f"{gateway.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10, trust_env=False) as response:
        events = response.iter_lines()
        assert next(events)  # the first event has come through
        during = scrape_url(gateway.url)  # the stream is open
        assert "data: [DONE]" in list(events)
    assert during.get("gateway_open_streams") == 1
    assert during.get("gateway_in_flight_requests") == 2
    with pytest.raises(openai.BadRequestError):
        team.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_body={"fake_scenario": "error_400"},
        )
    limited = gateway.client(api_key="sk-limited-0123456789")
    limited.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]

    fake = {"route": CHAT, "model": "fake-model", "backend": "fake"}
    after = scrape_until(gateway.url, lambda s: s.get("gateway_requests_total", status="200", **fake) >= 3)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("gateway_requests_total", status="200", **fake) == 3
    assert delta("gateway_requests_total", status="400", **fake) == 1
    assert delta("gateway_requests_total", status="429", **fake) == 1
    assert delta("gateway_ratelimit_rejections_total", key="limited") == 1
    assert delta("gateway_tokens_total", model="fake-model", key="team-a", type="completion") == 3 + 4
    assert delta("gateway_tokens_total", model="fake-model", key="limited", type="completion") == 1
    assert delta("gateway_time_to_first_token_seconds_count", model="fake-model", backend="fake") == 3
    assert delta("gateway_overhead_seconds_count") == 3
    assert delta("gateway_inter_token_seconds_count", model="fake-model") >= 4
    assert delta("gateway_request_duration_seconds_count", route=CHAT, model="fake-model", backend="fake") == 5
    assert after.get("gateway_backend_healthy", backend="fake") == 1
    assert after.get("gateway_in_flight_requests") == 1
    assert after.get("gateway_open_streams") == 0


def test_two_workers_serve_one_coherent_set_of_metrics(
    upstream: Upstream, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    metrics_parent = tmp_path / "tmp"
    metrics_parent.mkdir()
    gateway = start_gateway(gateway_config(upstream, "[server]\nworkers = 2\n"), env={"TMPDIR": str(metrics_parent)})
    headers = {"authorization": "Bearer sk-team-a-0123456789"}
    n = 20
    for _ in range(n):
        # New connections, so the kernel spreads them over both workers.
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 2},
            headers=headers,
            timeout=10,
            trust_env=False,
        )
        assert response.status_code == 200

    labels = {"route": CHAT, "model": "fake-model", "backend": "fake", "status": "200"}
    scrape_until(gateway.url, lambda s: s.get("gateway_requests_total", **labels) == n)
    for _ in range(8):  # whichever worker answers, the figures are the sum over both
        scraped = scrape_url(gateway.url)
        assert scraped.get("gateway_requests_total", **labels) == n
        assert scraped.get("gateway_tokens_total", model="fake-model", key="team-a", type="completion") == 2 * n
        assert scraped.total("gateway_request_duration_seconds_count", model="fake-model") == n
        assert scraped.get("gateway_in_flight_requests") == 1
        assert scraped.get("gateway_backend_healthy", backend="fake") == 1
    (directory,) = metrics_parent.iterdir()
    pids = {path.stem.rsplit("_", 1)[-1] for path in directory.glob("*.db")}
    assert len(pids) >= 2, f"one file set per worker: {sorted(p.name for p in directory.iterdir())}"
    assert gateway.stop() == 0
    assert not list(metrics_parent.iterdir()), "the CLI removes its metrics directory on the way out"
