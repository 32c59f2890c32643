"""Tracing's shortcut for calls whose caller did not sample the trace (services/common/tracing.py,
`_unsampled_parent`): no span is made, yet the call runs in the caller's trace (log lines name
it) and what it publishes carries the caller's `traceparent` unchanged (sampled flag 0)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace

from services.common import tracing
from services.common.config import load_config
from services.common.events import Bus
from services.common.logs import JsonFormatter, _ContextFilter
from services.common.server import RunningServer, create_server
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.unit.test_tracing import RecordingJetStream, finished

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
UNSAMPLED = f"00-{TRACE}-{SPAN}-00"
SAMPLED = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("metadata", "unsampled"),
    [
        ([("traceparent", UNSAMPLED)], True),
        ([("user-agent", "x"), ("traceparent", f"00-{TRACE}-{SPAN}-02")], True),  # random bit
        ([("traceparent", SAMPLED)], False),  # sampled: the SDK makes the span
        ([("traceparent", f"00-{TRACE}-{SPAN}-03")], False),
        ([], False),  # a new trace: the SDK's sampler decides
        ([("traceparent", UNSAMPLED), ("tracestate", "a=b")], False),  # carried by the SDK
        ([("tracestate", ""), ("traceparent", UNSAMPLED)], True),  # Envoy sends an empty one
        ([("traceparent", UNSAMPLED), ("traceparent", SAMPLED)], False),
        ([("traceparent", UNSAMPLED.upper())], False),  # invalid for W3C
        ([("traceparent", f"00-{'0' * 32}-{SPAN}-00")], False),
        ([("traceparent", f"00-{TRACE}-{'0' * 16}-00")], False),
        ([("traceparent", f"01-{TRACE}-{SPAN}-00")], False),  # other versions: the SDK's parser
        ([("traceparent", UNSAMPLED + "-x")], False),
    ],
)
def test_unsampled_parent(metadata: list[tuple[str, str]], unsampled: bool) -> None:
    span = tracing._unsampled_parent(metadata)
    assert (span is not None) == unsampled
    if span is not None:
        ctx = span.get_span_context()
        assert not span.is_recording() and ctx.is_remote and not ctx.trace_flags.sampled
        assert (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")) == (TRACE, SPAN)


class _Publishing(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.trace_ids: list[str] = []

    async def GetSession(self, request, context):
        self.trace_ids.append(tracing.current_trace_id())
        logging.getLogger("test.toy").warning("handling %s", request.name)
        await self.bus.publish("sessions.0.s.in", b"{}", stream="SESSIONS", msg_id=request.name)
        return pb.Session(name=request.name)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(_ContextFilter("gateway", "gateway-7"))
        self.json: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.json.append(json.loads(JsonFormatter().format(record)))


@pytest.fixture
async def server(spans: Any) -> AsyncIterator[tuple[_Publishing, RecordingJetStream, Any]]:
    js = RecordingJetStream()
    servicer = _Publishing(Bus(nc=None, js=js))  # type: ignore[arg-type]
    running: RunningServer = await create_server(
        load_config("gateway", {"SOMA_PORT": "0"}),
        ["soma.gateway.v1.GatewayService"],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, s),
    )
    await running.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    handler = _Capture()
    logging.getLogger().addHandler(handler)
    try:
        yield servicer, js, (gateway_pb2_grpc.GatewayServiceStub(channel), handler)
    finally:
        logging.getLogger().removeHandler(handler)
        await channel.close()
        await running.server.stop(0)


async def test_an_unsampled_call_makes_no_span_and_passes_the_trace_on(
    server: Any, spans: Any
) -> None:
    servicer, js, (stub, captured) = server
    await stub.GetSession(
        gateway_pb2.GetSessionRequest(name="sessions/u"), metadata=[("traceparent", UNSAMPLED)]
    )
    assert finished(spans) == []  # neither the server span nor the publish span
    assert servicer.trace_ids == [TRACE]
    assert [e["trace_id"] for e in captured.json if e["message"] == "handling sessions/u"] == [
        TRACE
    ]
    [sent] = js.published
    assert sent["headers"]["traceparent"] == UNSAMPLED  # as it came: the consumer drops it too
    assert trace.get_current_span() is trace.INVALID_SPAN  # the call's context is gone


async def test_a_sampled_call_still_makes_its_spans(server: Any, spans: Any) -> None:
    servicer, js, (stub, _) = server
    await stub.GetSession(
        gateway_pb2.GetSessionRequest(name="sessions/s"), metadata=[("traceparent", SAMPLED)]
    )
    publish, call = finished(spans)
    assert call.kind == trace.SpanKind.SERVER and publish.kind == trace.SpanKind.PRODUCER
    assert publish.parent.span_id == call.context.span_id
    assert format(call.parent.span_id, "016x") == SPAN
    [sent] = js.published
    assert sent["headers"]["traceparent"] == f"00-{TRACE}-{publish.context.span_id:016x}-01"
    assert servicer.trace_ids == [TRACE]
