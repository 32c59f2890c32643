"""Prometheus metrics: every metric of Soma Mesh is defined here, and only here.

The names, types and labels below are the contract with observability/alerts.yml and the Grafana
dashboards; change them only together. Each process serves them on its own loopback port
(`SOMA_METRICS_PORT`, 0 = no metrics server, the default for a bare `python -m services.x`;
`soma-mesh up` assigns free ports and renders a Prometheus scrape config for them).

| metric                                  | type      | labels                        |
|-----------------------------------------|-----------|-------------------------------|
| soma_build_info                         | gauge (1) | service, version              |
| soma_rpc_requests_total                 | counter   | service, method, code         |
| soma_rpc_duration_seconds               | histogram | service, method               |
| soma_rpc_in_flight                      | gauge     | service                       |
| soma_auth_decisions_total               | counter   | service, decision, credential |
| soma_cache_requests_total               | counter   | service, cache, result        |
| soma_jetstream_published_total          | counter   | service, stream               |
| soma_jetstream_publish_failures_total   | counter   | service, stream               |
| soma_jetstream_consumed_total           | counter   | service, consumer             |
| soma_jetstream_redeliveries_total       | counter   | service, consumer             |
| soma_jetstream_consumer_pending         | gauge     | service, consumer             |
| soma_audit_outbox_depth                 | gauge     | service                       |
| soma_audit_fail_closed_refusals_total   | counter   | service                       |
| soma_db_pool_connections                | gauge     | service, state                |
| soma_capsule_installs_total             | counter   | outcome                       |
| soma_capsule_install_duration_seconds   | histogram |                               |
| soma_circuit_breaker_state              | gauge     | service, dependency           |
| soma_circuit_breaker_rejections_total   | counter   | service, dependency           |

`service` is this process's part (gateway, keys, audit, capsule, worker), set once by `init`;
the replica is Prometheus' `instance` (the rendered scrape config sets it), never a label here.
Server-streaming RPCs are counted but not timed: a stream lives as long as its client wants,
so its duration would only distort the latency histogram.

Hot paths (every RPC, every auth decision, every cache lookup) use label children cached in
plain dicts: prometheus-client's `labels()` validates and locks on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from importlib import metadata
from typing import Any, Protocol

import grpc
from grpc import aio
from nats.js import JetStreamContext
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    wrap_handler,
)

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CAPSULE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LAG_SAMPLE_SECONDS = 5.0
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

# -- the definitions -----------------------------------------------------------------------

BUILD_INFO = Gauge("soma_build_info", "Always 1; labels name the build", ["service", "version"])
RPC_REQUESTS = Counter(
    "soma_rpc_requests_total",
    "Finished RPCs by method (/pkg.Service/Verb) and gRPC status code name",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "soma_rpc_duration_seconds",
    "Handler latency including interceptors (unary-response RPCs only)",
    ["service", "method"],
    buckets=RPC_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("soma_rpc_in_flight", "RPCs being handled", ["service"])
AUTH_DECISIONS = Counter(
    "soma_auth_decisions_total",
    "Authentication and authorization outcomes (allow, deny, unauthenticated)",
    ["service", "decision", "credential"],
)
CACHE_REQUESTS = Counter(
    "soma_cache_requests_total",
    "Cache lookups by cache (api_key, jwt, policy, tool_result) and result (hit, miss)",
    ["service", "cache", "result"],
)
JS_PUBLISHED = Counter(
    "soma_jetstream_published_total", "JetStream publishes acknowledged", ["service", "stream"]
)
JS_PUBLISH_FAILURES = Counter(
    "soma_jetstream_publish_failures_total",
    "JetStream publishes that failed or timed out",
    ["service", "stream"],
)
JS_CONSUMED = Counter(
    "soma_jetstream_consumed_total", "Messages acked by our consumers", ["service", "consumer"]
)
JS_REDELIVERIES = Counter(
    "soma_jetstream_redeliveries_total",
    "Messages received with a delivery count above 1",
    ["service", "consumer"],
)
JS_PENDING = Gauge(
    "soma_jetstream_consumer_pending",
    "Consumer lag: messages not yet delivered plus delivered but unacked (sampled)",
    ["service", "consumer"],
)
AUDIT_OUTBOX_DEPTH = Gauge(
    "soma_audit_outbox_depth", "Audit events waiting in the local outbox", ["service"]
)
AUDIT_REFUSALS = Counter(
    "soma_audit_fail_closed_refusals_total",
    "Mutations refused because their audit event could not be made durable",
    ["service"],
)
CAPSULE_INSTALLS = Counter(
    "soma_capsule_installs_total", "Capsule installs by outcome", ["outcome"]
)
CAPSULE_INSTALL_DURATION = Histogram(
    "soma_capsule_install_duration_seconds", "Capsule install duration", buckets=CAPSULE_BUCKETS
)
BREAKER_REJECTIONS = Counter(
    "soma_circuit_breaker_rejections_total",
    "Calls refused at once because the dependency's breaker is open",
    ["service", "dependency"],
)
# Read at scrape time by the collectors below (_PoolCollector, _BreakerCollector).
DB_POOL_CONNECTIONS = "soma_db_pool_connections"
BREAKER_STATE = "soma_circuit_breaker_state"

# -- process identity ----------------------------------------------------------------------

_service = "unknown"
_enabled = False
_children: dict[tuple[Any, ...], Any] = {}  # (metric, *labels) -> child, for the hot paths


def version() -> str:
    try:
        return metadata.version("soma-mesh")
    except metadata.PackageNotFoundError:
        return "unknown"


def init(service: str) -> None:
    """Names this process's part (the `service` label) and sets soma_build_info."""
    global _service
    _service = service
    _children.clear()
    BUILD_INFO.labels(service, version()).set(1)


def service() -> str:
    return _service


def enabled() -> bool:
    """True once this process serves its metrics (the RPC interceptor is installed only then)."""
    return _enabled


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serves /metrics on `host:port` (0 = a free port) in a daemon thread; returns the port.
    Refuses anything but a loopback address: the numbers name methods, tenants' traffic and
    dependencies, and the scrape endpoint has no authentication."""
    global _enabled
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise ValueError(f"metrics are served on loopback only, not on {host!r}")
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as error:
        raise OSError(
            f"cannot serve metrics on {host}:{port} ({error.strerror or error}); "
            "set SOMA_METRICS_PORT to a free port, or 0 to turn metrics off"
        ) from error
    _enabled = True
    return int(server.server_port)


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(_service, *labels)
    return child


# -- counters for the rest of the code -----------------------------------------------------


def auth_decision(decision: str, credential: str) -> None:
    """decision: allow | deny | unauthenticated; credential: api_key | jwt | none."""
    _child(AUTH_DECISIONS, decision, credential).inc()


def cache_lookup(cache: str, hit: bool) -> None:
    """cache: api_key | jwt | policy | tool_result."""
    _child(CACHE_REQUESTS, cache, "hit" if hit else "miss").inc()


def published(stream: str) -> None:
    _child(JS_PUBLISHED, stream).inc()


def publish_failed(stream: str) -> None:
    _child(JS_PUBLISH_FAILURES, stream).inc()


_V1_ACK_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>


def delivery_count(reply: str | None) -> int:
    """How often JetStream delivered a message, from its ack subject (1 if unknown). Cheaper
    than nats-py's `msg.metadata`, which also builds a datetime."""
    if not reply:
        return 1
    tokens = reply.split(".")
    # v2 subjects add a domain and an account hash after `$JS.ACK`.
    index = 4 if len(tokens) == _V1_ACK_TOKENS else 6
    try:
        return int(tokens[index])
    except (IndexError, ValueError):
        return 1


def received(consumer: str, reply: str | None) -> None:
    """Call for each message a consumer receives (`reply` = msg.reply): counts redeliveries."""
    if delivery_count(reply) > 1:
        _child(JS_REDELIVERIES, consumer).inc()


def acked(consumer: str, count: int = 1) -> None:
    _child(JS_CONSUMED, consumer).inc(count)


def audit_refused() -> None:
    _child(AUDIT_REFUSALS).inc()


def watch_audit_outbox(depth: Callable[[], int]) -> None:
    """soma_audit_outbox_depth reads `depth()` at scrape time (no bookkeeping per event)."""
    AUDIT_OUTBOX_DEPTH.labels(_service).set_function(depth)


def capsule_install(outcome: str, seconds: float | None = None) -> None:
    """outcome: installed | failed | rejected."""
    CAPSULE_INSTALLS.labels(outcome).inc()
    if seconds is not None:
        CAPSULE_INSTALL_DURATION.observe(seconds)


def breaker_rejected(dependency: str) -> None:
    _child(BREAKER_REJECTIONS, dependency).inc()


# -- the database pool, read at scrape time -------------------------------------------------


class Pool(Protocol):
    """What the collector reads from an asyncpg.Pool."""

    def get_size(self) -> int: ...

    def get_idle_size(self) -> int: ...

    def get_max_size(self) -> int: ...


class _PoolCollector(Collector):
    def __init__(self) -> None:
        # Held strongly: asyncpg's Pool has __slots__ without __weakref__.
        self.pools: dict[str, Pool] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            DB_POOL_CONNECTIONS,
            "Database pool connections by state (in_use, idle, max)",
            labels=["service", "state"],
        )
        # Runs in the scrape thread: these are plain reads of the pool's holder list.
        for name, pool in list(self.pools.items()):
            try:
                size, idle, most = pool.get_size(), pool.get_idle_size(), pool.get_max_size()
            except Exception:  # a pool closing under us: skip this scrape
                continue
            family.add_metric([name, "in_use"], size - idle)
            family.add_metric([name, "idle"], idle)
            family.add_metric([name, "max"], most)
        yield family


_POOLS = _PoolCollector()
REGISTRY.register(_POOLS)


def watch_pool(pool: Pool) -> None:
    """Reports `pool` as this process's database pool (one per process; a later one wins)."""
    _POOLS.pools[_service] = pool


# -- circuit breakers, read at scrape time ---------------------------------------------------


class Breaker(Protocol):
    """What the collector reads from a services.common.breaker.CircuitBreaker."""

    dependency: str

    @property
    def state(self) -> str: ...


class _BreakerCollector(Collector):
    def __init__(self) -> None:
        self.breakers: weakref.WeakValueDictionary[str, Breaker] = weakref.WeakValueDictionary()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            BREAKER_STATE,
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            labels=["service", "dependency"],
        )
        for dependency, breaker in list(self.breakers.items()):
            family.add_metric([_service, dependency], BREAKER_STATES[breaker.state])
        yield family


_BREAKERS = _BreakerCollector()
REGISTRY.register(_BREAKERS)


def watch_breaker(breaker: Breaker) -> None:
    """Reports `breaker`'s state (held weakly; one breaker per dependency and process)."""
    _BREAKERS.breakers[breaker.dependency] = breaker


def breaker_state(dependency: str) -> float | None:
    """The exported state of `dependency`'s breaker (for tests and status pages)."""
    breaker = _BREAKERS.breakers.get(dependency)
    return None if breaker is None else float(BREAKER_STATES[breaker.state])


# -- JetStream consumer lag ------------------------------------------------------------------


async def sample_consumer_lag(
    js: JetStreamContext,
    consumers: Sequence[tuple[str, str]],
    interval: float = LAG_SAMPLE_SECONDS,
) -> None:
    """Every `interval` seconds, soma_jetstream_consumer_pending of each (stream, consumer) =
    num_pending + num_ack_pending. Runs until cancelled; a failed sample keeps the last value."""
    while True:
        for stream, consumer in consumers:
            try:
                info = await js.consumer_info(stream, consumer, timeout=2.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # NATS down or consumer missing: try next round
                log.debug("lag of %s/%s not sampled: %s", stream, consumer, error)
                continue
            pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
            JS_PENDING.labels(_service, consumer).set(pending)
        await asyncio.sleep(interval)


def lag_samplers(js: JetStreamContext, consumers: Sequence[tuple[str, str]]) -> list[Any]:
    """The background task sampling `consumers`' lag, or none when metrics are off (the
    sample costs a NATS request per consumer)."""
    if not _enabled:
        return []
    return [asyncio.create_task(sample_consumer_lag(js, consumers), name="consumer-lag")]


# -- the RPC interceptor ---------------------------------------------------------------------


def _code_name(context: aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is not None:
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        for status in grpc.StatusCode:  # some grpc versions hand back the int
            if status.value[0] == code:
                return str(status.name)
        return str(code)
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"  # an exception grpc turns into UNKNOWN after we return


class _MethodMetrics:
    """The label children of one method, resolved once."""

    __slots__ = ("codes", "duration", "in_flight", "method", "service")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.duration = RPC_DURATION.labels(service, method)
        self.in_flight = RPC_IN_FLIGHT.labels(service)
        self.codes: dict[str, Any] = {}

    def finished(self, code: str) -> None:
        child = self.codes.get(code)
        if child is None:
            child = self.codes[code] = RPC_REQUESTS.labels(self.service, self.method, code)
        child.inc()


class MetricsInterceptor(WrappingInterceptor):
    """soma_rpc_requests_total, soma_rpc_duration_seconds and soma_rpc_in_flight. Installed
    outermost (services.common.server.create_server), so it sees the final code of every
    call, refusals by authn/authz included."""

    def __init__(self, service_name: str | None = None) -> None:
        super().__init__()
        self._service = service_name

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        m = _MethodMetrics(self._service or _service, method)
        clock = time.perf_counter

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                m.in_flight.inc()
                started = clock()
                error: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    m.duration.observe(clock() - started)
                    m.in_flight.dec()
                    m.finished(_code_name(context, error))

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                m.in_flight.inc()
                error: BaseException | None = None
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
                            yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    m.in_flight.dec()
                    m.finished(_code_name(context, error))

            return call

        return wrap_handler(handler, around_unary, around_stream)


def server_interceptors() -> list[aio.ServerInterceptor]:
    """The RPC metrics interceptor, or nothing when this process serves no metrics."""
    return [MetricsInterceptor()] if _enabled else []


__all__ = [
    "MetricsInterceptor",
    "acked",
    "audit_refused",
    "auth_decision",
    "breaker_rejected",
    "breaker_state",
    "cache_lookup",
    "capsule_install",
    "delivery_count",
    "enabled",
    "init",
    "lag_samplers",
    "publish_failed",
    "published",
    "received",
    "sample_consumer_lag",
    "server_interceptors",
    "service",
    "start_metrics_server",
    "watch_audit_outbox",
    "watch_breaker",
    "watch_pool",
]
