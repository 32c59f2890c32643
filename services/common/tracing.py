"""Tracing (OpenTelemetry): one user request is one trace, from Envoy to the worker and back.

    Envoy (soma-envoy) -> Gateway server span -> PostgreSQL queries -> publish SESSIONS
      -> worker: process worker-p<N> -> publish SESSIONS (the reply)
        -> Gateway: process gateway-replies -> PostgreSQL queries

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set; off, nothing is installed and every helper
here costs a flag check. On, `setup_tracing` installs a TracerProvider (resource
`service.name=soma-<service>`) exporting in batches over OTLP/gRPC, a gRPC server interceptor
(`server_interceptors`: ours, making the contrib's spans) and the asyncpg instrumentation. NATS
carries the W3C `traceparent` in message headers: `publish_span` injects it, `consume_span`
continues it. The contrib asyncpg instrumentation is used with one change
(`_asyncpg_instrumentor_class`) that cuts what tracing costs a request; the numbers, and what
is left, are in bench/README.md ("Tracing and metrics overhead").

| variable                    | default     | meaning                                              |
|-----------------------------|-------------|------------------------------------------------------|
| OTEL_EXPORTER_OTLP_ENDPOINT | (none: off) | OTLP/gRPC collector, e.g. http://127.0.0.1:4317      |
| SOMA_TRACE_SAMPLE           | 1.0         | share of new traces kept, 0..1 (children follow)     |
| SOMA_ENV                    | dev         | `deployment.environment` of the exported spans       |

The SDK's own OTEL_BSP_* variables (batch size, delay) apply as documented by OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncGenerator, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

log = logging.getLogger(__name__)

ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
SAMPLE_VAR = "SOMA_TRACE_SAMPLE"
SERVICE_PREFIX = "soma-"  # service.name = soma-gateway, soma-worker, ... (Envoy: soma-envoy)
ENVOY_SERVICE_NAME = "soma-envoy"
# Probed every second by Envoy and the supervisor: a trace each would drown the real ones.
UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_W3C = TraceContextTextMapPropagator()  # traceparent/tracestate, whatever OTEL_PROPAGATORS says


@dataclass(frozen=True)
class TraceSettings:
    endpoint: str  # "" = tracing off
    sample: float  # 0..1, share of new traces kept

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    def collector_address(self) -> tuple[str, int, bool]:
        """(host, port, tls) of the collector, for Envoy's cluster."""
        url = urlsplit(self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}")
        if not url.hostname:
            raise ConfigError(f"{ENDPOINT_VAR}={self.endpoint!r} names no host")
        tls = url.scheme == "https"
        return url.hostname, url.port or (443 if tls else 4317), tls


def load_trace_settings(env: Mapping[str, str]) -> TraceSettings:
    raw = env.get(SAMPLE_VAR, "").strip()
    sample = 1.0
    if raw:
        try:
            sample = float(raw)
        except ValueError:
            raise ConfigError(f"{SAMPLE_VAR}={raw!r} is not a number (use 0..1)") from None
        if not 0.0 <= sample <= 1.0:
            raise ConfigError(f"{SAMPLE_VAR}={raw!r}: use a share between 0 and 1, e.g. 0.1")
    settings = TraceSettings(env.get(ENDPOINT_VAR, "").strip(), sample)
    if settings.enabled:
        settings.collector_address()  # a malformed endpoint fails here, naming the variable
    return settings


def sampler(rate: float) -> Sampler:
    """ParentBased(TraceIdRatioBased(rate)), except that a database query or outgoing call
    outside any request (a poll loop, the audit writer's batches) starts no trace of its own:
    otherwise every idle replica would export a trace per second."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )

    class _RootSampler(Sampler):
        def __init__(self) -> None:
            self._ratio = TraceIdRatioBased(rate)

        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if kind is SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return self._ratio.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"NoBareClientSpans{{{self._ratio.get_description()}}}"

    return ParentBased(_RootSampler())


# The installed provider; None = tracing off in this process.
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


def enabled() -> bool:
    return _provider is not None


def setup_tracing(
    service: str,
    replica: str,
    env: Mapping[str, str],
    *,
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """Installs tracing for this process when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or an
    `exporter` is given, e.g. tests' in-memory one); returns the provider, or None when off."""
    global _provider, _tracer
    settings = load_trace_settings(env)
    if not settings.enabled and exporter is None:
        return None
    if _provider is not None:
        raise RuntimeError("tracing is already set up in this process; shutdown_tracing() first")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # An http:// endpoint means plaintext, https:// TLS (the exporter reads the scheme).
        exporter = OTLPSpanExporter(endpoint=settings.endpoint)
    resource = Resource.create(
        {
            "service.name": SERVICE_PREFIX + service,
            "service.instance.id": replica,
            "deployment.environment": env.get("SOMA_ENV", "dev").strip() or "dev",
        }
    )
    provider = TracerProvider(resource=resource, sampler=sampler(settings.sample))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer("soma")
    # The global provider too, for libraries that trace on their own; it can be set only once
    # per process, so a second setup (tests) keeps the first as the global one.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)
    if not env.get("OTEL_PROPAGATORS"):
        # W3C trace context only (what Envoy sends): the default also parses `baggage` on every
        # call, which nothing here uses.
        propagate.set_global_textmap(_W3C)
    _asyncpg_instrumentor().instrument(tracer_provider=provider)
    if settings.enabled:
        log.info("tracing to %s, sampling %g of new traces", settings.endpoint, settings.sample)
    return provider


@functools.cache
def _asyncpg_instrumentor_class() -> Any:
    """The contrib asyncpg instrumentation, doing nothing for a query whose caller's span is
    not recorded. The sampler would drop that span anyway (a query is never a trace's root, and
    follows its parent otherwise), but the contrib wrapper builds its attributes and a span
    first: about a third of what tracing cost an unsampled request (bench/README.md)."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    class RecordedOnly(AsyncPGInstrumentor):
        # The three wrappers the contrib class installs (asyncpg Connection, Cursor, prepared
        # statement methods), with the same signature.
        async def _do_execute(self, func: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            if not trace.get_current_span().is_recording():
                return await func(*args, **kwargs)
            return await super()._do_execute(func, instance, args, kwargs)

        async def _do_cursor_execute(self, func: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            if not trace.get_current_span().is_recording():
                return await func(*args, **kwargs)
            return await super()._do_cursor_execute(func, instance, args, kwargs)

        async def _do_prepared_execute(
            self, func: Any, instance: Any, args: Any, kwargs: Any
        ) -> Any:
            if not trace.get_current_span().is_recording():
                return await func(*args, **kwargs)
            return await super()._do_prepared_execute(func, instance, args, kwargs)

    return RecordedOnly  # one class (cached): BaseInstrumentor keeps one instance per class


def _asyncpg_instrumentor() -> Any:
    return _asyncpg_instrumentor_class()()


def shutdown_tracing(timeout_seconds: float = 5.0) -> None:
    """Exports what is buffered (bounded) and uninstalls; a no-op when tracing is off."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, trace.NoOpTracer()
    if provider is None:
        return
    _asyncpg_instrumentor().uninstrument()
    provider.force_flush(int(timeout_seconds * 1000))
    provider.shutdown()


def server_interceptors() -> list[aio.ServerInterceptor]:
    """A SERVER span per call (continuing the caller's `traceparent`), or nothing when tracing
    is off. Put it outermost, so every log line of a call carries its trace id."""
    if _provider is None:
        return []
    return [_server_spans_class()(_tracer)]


# The span of a server call: named after the method, with the attributes of OpenTelemetry's gRPC
# conventions, as the contrib aio server interceptor made them.
_ERROR_CODES = frozenset(  # a server's own failures; the others are the caller's (status UNSET)
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _peer_attributes(peer: str) -> dict[str, str]:
    """`ipv4:127.0.0.1:57284`, `ipv6:[::1]:57284` -> net.peer.ip/port (name for loopback)."""
    if peer.startswith("unix:"):
        return {}
    try:
        ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
    except (IndexError, ValueError):
        return {}
    ip = unquote(ip)
    attributes = {"net.peer.ip": ip, "net.peer.port": port}
    if ip in ("[::1]", "127.0.0.1"):
        attributes["net.peer.name"] = "localhost"
    return attributes


# A W3C version-00 `traceparent` whose sampled flag (bit 0 of the flags) is not set.
_UNSAMPLED_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f][02468ace])")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16


def _unsampled_parent(metadata: Any) -> trace.NonRecordingSpan | None:
    """The caller's span when its `traceparent` says the trace is not sampled (and `tracestate`
    is absent or empty): what `propagate.extract` would return for it, without the SDK. None
    otherwise (no or a sampled `traceparent`, anything unusual): then the SDK decides."""
    header = None
    for key, value in metadata:
        if key == "traceparent":
            if header is not None:
                return None
            header = value
        elif key == "tracestate" and value:  # Envoy sends an empty one: the same as none
            return None
    if header is None:
        return None
    match = _UNSAMPLED_TRACEPARENT.fullmatch(header)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return trace.NonRecordingSpan(
        trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(flags, 16)),
        )
    )


@functools.cache
def _server_spans_class() -> Any:
    """Our server span interceptor. It replaced the contrib aio server interceptor, whose
    streaming wrapper iterates the next handler's generator without closing it: a stream the
    client cancelled left the inner generators of the chain to Python's garbage collection,
    which closed them from another task and context ("Failed to detach context", and
    `ContextVar.reset` failing in every `finally` of the chain; tracing on, replicas also
    crashed). It also costs less per call: no proxy around the servicer context (the code is
    read from the context at the end), the handler wrapped once per method."""
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from services.common.interceptors import (
        StreamBehavior,
        UnaryBehavior,
        WrappingInterceptor,
        wrap_handler,
    )

    class ServerSpans(WrappingInterceptor):
        def __init__(self, tracer: trace.Tracer) -> None:
            super().__init__()
            self._tracer = tracer

        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method.startswith(UNTRACED_PREFIXES) or not is_instrumentation_enabled():
                return await continuation(details)
            return await super().intercept_service(continuation, details)

        def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
            tracer = self._tracer
            # The shortcut for unsampled callers assumes W3C trace context and our sampler,
            # which follows an unsampled parent (ParentBased); anything else takes the SDK path.
            fast = propagate.get_global_textmap() is _W3C
            service, _, name = method.lstrip("/").partition("/")
            constant = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

            def start(context: aio.ServicerContext) -> tuple[trace.Span, Any]:
                metadata = context.invocation_metadata() or ()
                unsampled = _unsampled_parent(metadata) if fast else None
                if unsampled is not None:
                    # The caller did not sample this trace: the sampler would drop the span
                    # (ParentBased), so make none; the caller's context becomes the current one,
                    # for log lines' trace id and the `traceparent` of what the call publishes
                    # (a new context, as `propagate.extract` makes).
                    parent = trace.set_span_in_context(unsampled, otel_context.Context())
                    return unsampled, otel_context.attach(parent)
                carrier: dict[str, Any] = {}
                for key, value in metadata:
                    carrier[key] = value
                parent = propagate.extract(carrier)
                span = tracer.start_span(
                    method, context=parent, kind=SpanKind.SERVER, attributes=constant
                )
                if span.is_recording():  # an unsampled call skips the rest
                    agent = carrier.get("user-agent")
                    if agent:
                        span.set_attribute("rpc.user_agent", agent)
                    span.set_attributes(_peer_attributes(context.peer() or ""))
                return span, otel_context.attach(trace.set_span_in_context(span, parent))

            def finish(
                context: aio.ServicerContext, span: trace.Span, token: Any, error: Any
            ) -> None:
                if not span.is_recording():  # nothing of it is exported: skip the attributes
                    span.end()
                    otel_context.detach(token)
                    return
                try:
                    if isinstance(error, asyncio.CancelledError):
                        code = grpc.StatusCode.CANCELLED
                    elif error is not None and not isinstance(error, aio.AbortError):
                        span.record_exception(error)
                        code = grpc.StatusCode.UNKNOWN  # what grpc answers for it
                    else:
                        raw = context.code()
                        code = _CODES_BY_VALUE.get(raw, raw) if isinstance(raw, int) else raw
                        code = code or grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in _ERROR_CODES:
                        details = (
                            context.details()
                            if error is None or isinstance(error, aio.AbortError)
                            else str(error)
                        )
                        span.set_status(trace.StatusCode.ERROR, f"{code}:{details or ''}")
                finally:
                    span.end()
                    otel_context.detach(token)

            def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
                async def call(request: Any, context: aio.ServicerContext) -> Any:
                    span, token = start(context)
                    error: BaseException | None = None
                    try:
                        return await behavior(request, context)
                    except BaseException as raised:
                        error = raised
                        raise
                    finally:
                        finish(context, span, token, error)

                return call

            def around_stream(behavior: StreamBehavior) -> StreamBehavior:
                async def call(
                    request: Any, context: aio.ServicerContext
                ) -> AsyncGenerator[Any, None]:
                    span, token = start(context)
                    error: BaseException | None = None
                    try:
                        async with contextlib.aclosing(behavior(request, context)) as responses:
                            async for response in responses:  # closed here, in the call's task
                                yield response
                    except GeneratorExit:
                        error = asyncio.CancelledError()  # closed early: the client left
                        raise
                    except BaseException as raised:
                        error = raised
                        raise
                    finally:
                        finish(context, span, token, error)

                return call

            return wrap_handler(handler, around_unary, around_stream)

    return ServerSpans


def client_interceptors() -> list[aio.ClientInterceptor]:
    """For a grpc.aio channel a service opens to another: CLIENT spans carrying `traceparent`."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_provider))


def current_trace_id() -> str:
    """The trace id (32 hex digits) of the current span, "" outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Adds the current trace context (`traceparent`, `tracestate`) to message headers."""
    if _provider is not None:
        _W3C.inject(headers)
    return headers


@contextlib.contextmanager
def publish_span(
    subject: str, stream: str, headers: MutableMapping[str, str]
) -> Iterator[trace.Span | None]:
    """A PRODUCER span around one JetStream publish; `headers` get its `traceparent`, so the
    consumer's span becomes its child."""
    if _provider is None:
        yield None
        return
    current = trace.get_current_span()
    parent = current.get_span_context()
    if parent.is_valid and not parent.trace_flags.sampled:
        # Inside a trace its caller did not sample: the sampler would drop this span (it follows
        # its parent), so make none and pass the caller's `traceparent` on as it came.
        _W3C.inject(headers)
        yield current
        return
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "publish",
        "messaging.destination.name": subject,
        "messaging.message.id": headers.get("Nats-Msg-Id", ""),
    }
    with _tracer.start_as_current_span(
        f"publish {stream}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        _W3C.inject(headers)
        yield span


@contextlib.contextmanager
def consume_span(
    consumer: str, subject: str, headers: Mapping[str, str] | None
) -> Iterator[trace.Span | None]:
    """A CONSUMER span for handling one message, continuing the publisher's trace when the
    headers carry a `traceparent` (a new trace otherwise); current while the block runs."""
    if _provider is None:
        yield None
        return
    parent = _W3C.extract(dict(headers or {}), context=otel_context.Context())
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "messaging.consumer.group.name": consumer,
    }
    with _tracer.start_as_current_span(
        f"process {consumer}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span


__all__ = [
    "ENVOY_SERVICE_NAME",
    "TraceSettings",
    "client_interceptors",
    "consume_span",
    "current_trace_id",
    "enabled",
    "inject",
    "load_trace_settings",
    "publish_span",
    "sampler",
    "server_interceptors",
    "setup_tracing",
    "shutdown_tracing",
]
