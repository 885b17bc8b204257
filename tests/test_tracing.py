"""Tracing: spans for the request, its upstream call and Redis commands, the upstream's traceparent,
export over OTLP (http/protobuf and grpc) from a gateway process, and nothing at all when it is off."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pytest_httpx import HTTPXMock

from gateway.app import create_app
from gateway.settings import BackendSettings, RedisSettings, Settings
from gateway.tracing import Tracing, from_env
from tests.conftest import LOCALHOST, GatewayFactory, Upstream, free_port

UP = "http://upstream/v1"
CHAT = "/v1/chat/completions"
MARKER = "lapis-heron-0231"
MESSAGES = [{"role": "user", "content": MARKER}]


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        backends=[
            BackendSettings(name="mock", kind="mock", models=["mock"]),
            BackendSettings(name="up", kind="vllm", base_url=UP, models=["up-model"]),
        ]
    )
    return Settings(**(base | overrides))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test"))


@pytest.fixture
async def client(tracing: Tracing) -> AsyncIterator[AsyncTestClient]:
    async with (
        httpx.AsyncClient() as http,
        AsyncTestClient(app=create_app(settings(), http=http, tracing=tracing)) as test_client,
    ):
        yield test_client


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name]
    return found


def traceparent(span: ReadableSpan) -> str:
    """``version-trace id-span id-``, the flags left out."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-"


async def test_chat_request_and_upstream_spans(
    client: AsyncTestClient, exporter: InMemorySpanExporter, httpx_mock: HTTPXMock
) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    httpx_mock.add_response(url=f"{UP}/chat/completions", json={"id": "c1", "choices": [], "usage": usage})
    response = await client.post(CHAT, json={"model": "up-model", "messages": MESSAGES})
    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    request = one(spans, "POST /v1/chat/completions")
    upstream = one(spans, "upstream /chat/completions")

    assert request.kind is SpanKind.SERVER
    assert request.attributes is not None
    assert request.attributes["http.route"] == CHAT
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.request.model"] == "up-model"
    assert request.attributes["gateway.backend"] == "up"
    assert request.attributes["gateway.request_id"] == response.headers["x-request-id"]
    assert request.attributes["gen_ai.usage.output_tokens"] == 3

    assert upstream.kind is SpanKind.CLIENT
    assert upstream.parent is not None
    assert upstream.parent.span_id == request.context.span_id
    assert upstream.attributes is not None
    assert upstream.attributes["gen_ai.request.model"] == "up-model"
    assert upstream.attributes["gateway.backend"] == "up"
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.attributes["gen_ai.usage.input_tokens"] == 7
    assert upstream.status.status_code is StatusCode.UNSET

    sent = httpx_mock.get_request()
    assert sent is not None
    assert sent.headers["traceparent"].startswith(traceparent(upstream))
    # Spans name what happened, never what was said.
    assert all(MARKER not in str(value) for span in spans for value in (span.attributes or {}).values())


async def test_stream_upstream_span_ends_with_the_stream(
    client: AsyncTestClient, exporter: InMemorySpanExporter
) -> None:
    body = {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        await response.aread()
    spans = exporter.get_finished_spans()
    upstream = one(spans, "upstream /chat/completions")
    request = one(spans, "POST /v1/chat/completions")
    assert upstream.attributes is not None
    assert upstream.attributes["gateway.backend"] == "mock"
    assert upstream.attributes["gen_ai.usage.output_tokens"] == 3
    assert "gateway.ttft_ms" in upstream.attributes
    assert upstream.end_time is not None and request.end_time is not None
    assert upstream.end_time <= request.end_time


async def test_a_clients_traceparent_is_continued(client: AsyncTestClient, exporter: InMemorySpanExporter) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = await client.post(
        CHAT, json={"model": "mock", "messages": MESSAGES, "max_tokens": 1}, headers={"traceparent": parent}
    )
    assert response.status_code == 200
    request = one(exporter.get_finished_spans(), "POST /v1/chat/completions")
    assert f"{request.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert request.parent is not None
    assert f"{request.parent.span_id:016x}" == "b7ad6b7169203331"


async def test_upstream_error_marks_both_spans(
    client: AsyncTestClient, exporter: InMemorySpanExporter, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=f"{UP}/chat/completions", status_code=400, json={"error": {"message": "bad"}})
    response = await client.post(CHAT, json={"model": "up-model", "messages": MESSAGES})
    assert response.status_code == 400
    spans = exporter.get_finished_spans()
    upstream = one(spans, "upstream /chat/completions")
    assert upstream.status.status_code is StatusCode.ERROR
    assert upstream.attributes is not None
    assert upstream.attributes["http.response.status_code"] == 400
    request = one(spans, "POST /v1/chat/completions")
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 400


async def test_unmatched_paths_get_a_bounded_span_name(client: AsyncTestClient, exporter: InMemorySpanExporter) -> None:
    assert (await client.get("/no/such/thing")).status_code == 404
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET unmatched"


async def test_redis_commands_are_spans(redis_url: str, tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    app = create_app(settings(redis=RedisSettings(url=redis_url)), tracing=tracing)
    async with AsyncTestClient(app=app) as client:
        response = await client.post(CHAT, json={"model": "mock", "messages": MESSAGES, "max_tokens": 1})
        assert response.status_code == 200
        await app.state.history.drain(5)
        conversation = await client.post("/v1/conversations", json={})
        assert conversation.status_code == 200
    spans = exporter.get_finished_spans()
    redis_spans = [s for s in spans if (s.attributes or {}).get("db.system.name") == "redis"]
    assert redis_spans, [s.name for s in spans]
    assert all(s.kind is SpanKind.CLIENT for s in redis_spans)
    # The history write runs in the background writer; a conversation's creation inside its request.
    request = one(spans, "POST /v1/conversations")
    children = [s for s in redis_spans if s.parent is not None and s.parent.span_id == request.context.span_id]
    assert children, [(s.name, s.parent) for s in redis_spans]
    assert all(MARKER not in str(value) for span in spans for value in (span.attributes or {}).values())


def test_off_unless_an_endpoint_is_set() -> None:
    assert from_env({}).tracer is None
    assert (
        from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}).tracer
        is None
    )
    assert from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}).tracer is not None


def test_off_starts_nothing_of_opentelemetry() -> None:
    """redis-py and Litestar import parts of OpenTelemetry's API on their own when it is installed;
    with tracing off, serving requests imports nothing more, and no SDK or exporter at all."""
    code = """
import asyncio, sys
from litestar.testing import AsyncTestClient
from gateway.app import create_app
from gateway.settings import BackendSettings, Settings

def loaded():
    return {m for m in sys.modules if m.startswith("opentelemetry")}

async def main():
    app = create_app(Settings(backends=[BackendSettings(name="mock", kind="mock", models=["mock"])]))
    before = loaded()
    async with AsyncTestClient(app=app) as client:
        body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    sdk = {m for m in loaded() if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))}
    print(sorted(loaded() - before), sorted(sdk))

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[] []"


# -- a gateway process exporting over OTLP --------------------------------------------------------


class Collector:
    """What an OTLP receiver got: span name -> (trace id hex, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: json.loads(_any_json(a.value)) for a in span.attributes}
                        self.spans.append((span.name, span.trace_id.hex(), attributes))

    def wait_for(self, name: str, timeout: float = 10) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for span_name, trace_id, attributes in self.spans:
                    if span_name == name:
                        return trace_id, attributes
            time.sleep(0.05)
        raise AssertionError(f"no span {name!r} exported: {[s[0] for s in self.spans]}")


def _any_json(value: Any) -> str:
    kind = value.WhichOneof("value")
    return json.dumps(getattr(value, kind) if kind else None)


@pytest.fixture
def http_collector() -> Iterator[tuple[Collector, str]]:
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces":
                collector.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector, f"http://{LOCALHOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grpc_collector() -> Iterator[tuple[Collector, str]]:
    import grpc

    collector = Collector()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            collector.take(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = free_port()
    server.add_insecure_port(f"{LOCALHOST}:{port}")
    server.start()
    try:
        yield collector, f"http://{LOCALHOST}:{port}"
    finally:
        server.stop(0)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_a_gateway_process_exports_spans_over_otlp(
    protocol: str, request: pytest.FixtureRequest, upstream: Upstream, start_gateway: GatewayFactory
) -> None:
    collector, endpoint = request.getfixturevalue("grpc_collector" if protocol == "grpc" else "http_collector")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "gateway-under-test",
    }
    gateway = start_gateway(
        f"""
{upstream.backend_toml()}""",
        env=env,
    )
    completion = gateway.client().chat.completions.create(model="fake-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content

    trace_id, attributes = collector.wait_for("upstream /chat/completions")
    assert attributes["gateway.backend"] == "fake"
    assert attributes["gen_ai.request.model"] == "fake-model"
    request_trace, request_attributes = collector.wait_for("POST /v1/chat/completions")
    assert request_trace == trace_id
    assert request_attributes["http.response.status_code"] == 200
    (sent,) = upstream.requests("/v1/chat/completions")
    headers = {name.lower(): value for name, value in sent["headers"].items()}
    assert headers["traceparent"].split("-")[1] == trace_id
