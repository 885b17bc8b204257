"""OpenTelemetry spans: one per request, one for its upstream call, one per Redis command.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the ``otel`` extra is installed
(``pip install 'llm-gateway[otel]'``); spans are then exported over OTLP, ``http/protobuf`` or ``grpc``
as ``OTEL_EXPORTER_OTLP_PROTOCOL`` says, and the exporter reads the other ``OTEL_*`` variables itself.
Off, nothing of OpenTelemetry is imported and each request pays one ``is None`` test.

A client's ``traceparent`` is continued, and the upstream call's goes upstream: an httpx request hook
on the backends' clients writes the current span's context into every request they send, so neither
the upstream nor the relay code needs to know about tracing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
from litestar.types import Scope

from gateway.reply import Reply

__all__ = ["Tracing", "UpstreamSpan", "from_env"]

log = logging.getLogger("gateway.tracing")

_PROTOCOLS = ("http/protobuf", "grpc")


def from_env(environ: Mapping[str, str]) -> Tracing:
    """Tracing as the ``OTEL_*`` variables say: off unless an OTLP endpoint is set."""
    if not (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return Tracing(None)
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in _PROTOCOLS:
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (use http/protobuf or grpc); tracing is off", protocol
        )
        return Tracing(None)
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s); tracing is off. "
            "Install the extra: pip install 'llm-gateway[otel]'",
            exc,
        )
        return Tracing(None)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: environ.get("OTEL_SERVICE_NAME", "llm-gateway")}))
    # Batched, on the SDK's own thread; the provider flushes what is left when the process exits.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing: spans exported over OTLP (%s)", protocol)
    return Tracing(provider.get_tracer("gateway"))


class Tracing:
    """The app's tracer, or ``None``: off."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    # -- the request ----------------------------------------------------------------------------

    def start_request(self, scope: Scope) -> Any:
        """The request's span, made current (so the handler's spans are its children) until
        :meth:`end_request`. Continues the client's trace when it sent a ``traceparent``."""
        from opentelemetry import context, propagate, trace

        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        parent = propagate.extract(carrier)
        method = scope["method"]
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        return span, context.attach(trace.set_span_in_context(span, parent)), method

    def end_request(self, handle: Any, *, route: str, status: int, attributes: dict[str, Any]) -> None:
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        span, token, method = handle
        context.detach(token)
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attributes({name: value for name, value in attributes.items() if value is not None and value != ""})
        if status >= 500:
            span.set_status(StatusCode.ERROR)
        span.end()

    # -- the upstream call ----------------------------------------------------------------------

    def upstream(self, model: str, path: str, backend: str) -> UpstreamSpan | _NoSpan:
        """The span of a request's upstream call, retries and fallbacks included; ``backend`` is the
        first candidate (the reply says which one answered)."""
        if self.tracer is None:
            return _NO_SPAN
        from opentelemetry import trace

        span = self.tracer.start_span(
            f"upstream {path}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.request.model": model,
                "gateway.backend": backend,
                "http.request.method": "POST",
                "url.path": path,
            },
        )
        return UpstreamSpan(span)

    def instrument_http(self, client: httpx.AsyncClient) -> None:
        """Every request ``client`` sends carries the current span's ``traceparent``."""
        if self.tracer is None:
            return
        hooks = client.event_hooks
        if _inject not in hooks["request"]:
            hooks["request"] = [*hooks["request"], _inject]
            client.event_hooks = hooks

    # -- Redis ----------------------------------------------------------------------------------

    def instrument_redis(self, redis: Any) -> None:
        """A span per command and per pipeline ``redis`` runs; named by the command only, since keys
        and values hold tenants, users and what they wrote."""
        if self.tracer is None or redis is None:
            return
        from opentelemetry.trace import SpanKind

        tracer = self.tracer
        execute_command = redis.execute_command
        make_pipeline = redis.pipeline

        async def traced_command(*args: Any, **options: Any) -> Any:
            name = str(args[0]) if args else "?"
            attributes = {"db.system.name": "redis", "db.operation.name": name}
            with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
                return await execute_command(*args, **options)

        def traced_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = make_pipeline(*args, **kwargs)
            execute = pipe.execute

            async def traced_execute(*a: Any, **k: Any) -> Any:
                name = "MULTI" if pipe.is_transaction else "PIPELINE"
                attributes = {
                    "db.system.name": "redis",
                    "db.operation.name": name,
                    "db.operation.batch.size": len(pipe.command_stack),
                }
                with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes):
                    return await execute(*a, **k)

            pipe.execute = traced_execute
            return pipe

        redis.execute_command = traced_command
        redis.pipeline = traced_pipeline


async def _inject(request: httpx.Request) -> None:
    from opentelemetry import propagate

    propagate.inject(request.headers)


class UpstreamSpan:
    """Current while the request is sent upstream, so its ``traceparent`` is the one that goes there;
    ended with the reply (a stream's last event), or with the error that ended the call."""

    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        from opentelemetry import trace

        try:
            with trace.use_span(self._span, record_exception=False, set_status_on_exception=False):
                yield
        except BaseException as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        from opentelemetry.trace import StatusCode

        status = getattr(exc, "status", None)
        if isinstance(status, int):
            self._span.set_attribute("http.response.status_code", status)
        self._span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
        self._span.set_status(StatusCode.ERROR, str(exc))
        self._span.end()

    def end(self, reply: Reply) -> None:
        from opentelemetry.trace import StatusCode

        span = self._span
        span.set_attribute("http.response.status_code", 200)
        if reply.backend:
            span.set_attribute("gateway.backend", reply.backend)
        if reply.model:
            span.set_attribute("gen_ai.response.model", reply.model)
        if reply.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", reply.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", reply.usage.completion_tokens)
        if reply.first_token is not None:
            span.set_attribute("gateway.ttft_ms", round(reply.first_token * 1000, 1))
        span.set_attribute("gateway.retries", reply.retries)
        if reply.error:
            span.set_attribute("error.type", reply.error)
            span.set_status(StatusCode.ERROR, reply.error)
        span.end()


class _NoSpan:
    """What :meth:`Tracing.upstream` gives while tracing is off."""

    __slots__ = ()
    _current = contextlib.nullcontext()

    def current(self) -> contextlib.nullcontext[None]:
        return self._current

    def end(self, reply: Reply) -> None:
        pass


_NO_SPAN = _NoSpan()
