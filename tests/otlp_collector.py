"""A tiny OTLP/gRPC trace collector on a loopback port, for tests and benchmarks.

It implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` (what the Python
exporter and Envoy's `envoy.tracers.opentelemetry` send) and keeps the spans in memory, so a
test can assert the span tree of one request. `keep=0` makes it a sink that only counts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 1, 2, 3, 4, 5


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str  # "" for a root span
    name: str
    kind: int
    service: str  # the resource's service.name
    attributes: dict[str, Any] = field(default_factory=dict)


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: TraceCollector) -> None:
        self.collector = collector

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if not self.collector.keeps:  # a sink (benchmarks): count, spend nothing else
            self.collector.count(
                sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            )
            return trace_service_pb2.ExportTraceServiceResponse()
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            service=service,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        self.collector.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceCollector:
    """`with TraceCollector() as c:` listens on 127.0.0.1:<free port>; `c.endpoint` is the
    value for OTEL_EXPORTER_OTLP_ENDPOINT."""

    def __init__(self, keep: int = 200_000) -> None:
        self._spans: deque[Span] = deque(maxlen=keep or 1)
        self._keep = keep
        self._lock = threading.Lock()
        self.received = 0  # spans received in total (also when not kept)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        if not self.port:
            raise OSError("the trace collector could not bind a loopback port")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TraceCollector:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1.0).wait(5.0)

    @property
    def keeps(self) -> bool:
        return self._keep > 0

    def count(self, n: int) -> None:
        with self._lock:
            self.received += n

    def add(self, spans: list[Span]) -> None:
        with self._lock:
            self.received += len(spans)
            self._spans.extend(spans)

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(
        self, predicate: Callable[[list[Span]], bool], trace_id: str | None, within: float
    ) -> list[Span]:
        """The spans (of `trace_id`) once `predicate` holds for them; AssertionError after
        `within` seconds, naming what arrived."""
        deadline = time.monotonic() + within
        while True:
            spans = self.spans(trace_id)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                listed = "\n".join(f"  {s.service} {s.name} kind={s.kind}" for s in spans)
                raise AssertionError(f"spans of trace {trace_id} after {within}s:\n{listed}")
            time.sleep(0.1)
