"""One user request is one trace: SendMessage through Envoy, followed to the worker and back.

The session mesh exports every span to the in-process collector of conftest.py
(`trace_collector`). The tree asserted here:

    soma-envoy (root, started by Envoy)
      soma-gateway  /soma.gateway.v1.GatewayService/SendMessage   SERVER
        soma-gateway  PostgreSQL queries                           CLIENT
        soma-gateway  publish SESSIONS                             PRODUCER
          soma-worker   process worker-p<N>                        CONSUMER
            soma-worker   publish SESSIONS (the reply)             PRODUCER
              soma-gateway  process gateway-replies                CONSUMER
                soma-gateway  PostgreSQL queries                   CLIENT
        soma-gateway  publish AUDIT                                PRODUCER
          soma-audit    process audit-writer                       CONSUMER
"""

from __future__ import annotations

import asyncio
import re
import uuid

import grpc
import pytest

from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner
from tests.otlp_collector import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_PRODUCER,
    KIND_SERVER,
    Span,
    TraceCollector,
)

pytestmark = pytest.mark.integration

SEND = "/soma.gateway.v1.GatewayService/SendMessage"


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    out = []
    while span.parent_id:
        parent = by_id.get(span.parent_id)
        assert parent is not None, f"{span.service} {span.name}: parent {span.parent_id} missing"
        out.append(parent)
        span = parent
    return out


def _one(spans: list[Span], service: str, kind: int, name: str | re.Pattern[str]) -> Span:
    found = [
        s
        for s in spans
        if s.service == service
        and s.kind == kind
        and (s.name == name if isinstance(name, str) else name.fullmatch(s.name))
    ]
    assert len(found) == 1, f"{service} {name}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def _complete(spans: list[Span]) -> bool:
    names = {(s.service, s.name) for s in spans}
    return {
        ("soma-gateway", SEND),
        ("soma-gateway", "process gateway-replies"),
        ("soma-audit", "process audit-writer"),
    } <= names and any(s.service == "soma-envoy" for s in spans)


async def test_send_message_is_one_trace_from_envoy_to_the_worker_and_back(
    channel: grpc.aio.Channel, mesh: MeshRunner, trace_collector: TraceCollector
) -> None:
    gw = gateway_pb2_grpc.GatewayServiceStub(channel)
    session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
    sent = await gw.SendMessage(
        g.SendMessageRequest(
            parent=session.name,
            message=pb.Message(content=f"trace me {uuid.uuid4()}", tool="wordcount"),
        )
    )
    message_id = sent.name.rsplit("/", 1)[1]

    # The Gateway's server span of this SendMessage: the one whose publish carried its id.
    def published(spans: list[Span]) -> bool:
        return any(s.attributes.get("messaging.message.id") == message_id for s in spans)

    [publish] = [
        s
        for s in await asyncio.to_thread(trace_collector.wait_for, published, None, 20.0)
        if s.attributes.get("messaging.message.id") == message_id
    ]
    trace_id = publish.trace_id
    spans = await asyncio.to_thread(trace_collector.wait_for, _complete, trace_id, 30.0)
    by_id = {s.span_id: s for s in spans}

    # One root, Envoy's; everything else descends from it.
    roots = [s for s in spans if not s.parent_id]
    assert [r.service for r in roots] == ["soma-envoy"], roots
    root = roots[0]
    for span in spans:
        assert span is root or root in _ancestors(span, by_id), span

    server = _one(spans, "soma-gateway", KIND_SERVER, SEND)
    assert root in _ancestors(server, by_id)
    assert server.attributes["rpc.grpc.status_code"] == 0

    db_in_call = [s for s in spans if s.kind == KIND_CLIENT and s.parent_id == server.span_id]
    assert db_in_call, "no PostgreSQL span under the Gateway's server span"
    assert all(s.service == "soma-gateway" for s in db_in_call)

    assert publish.parent_id == server.span_id and publish.kind == KIND_PRODUCER
    assert publish.name == "publish SESSIONS"
    process = _one(spans, "soma-worker", KIND_CONSUMER, re.compile(r"process worker-p\d+"))
    assert process.parent_id == publish.span_id
    reply = _one(spans, "soma-worker", KIND_PRODUCER, "publish SESSIONS")
    assert reply.parent_id == process.span_id
    assert reply.attributes["messaging.message.id"] == f"reply-{message_id}"
    ingest = _one(spans, "soma-gateway", KIND_CONSUMER, "process gateway-replies")
    assert ingest.parent_id == reply.span_id
    assert any(s.kind == KIND_CLIENT and s.parent_id == ingest.span_id for s in spans), (
        "the reply was stored outside the trace"
    )

    audit_publish = _one(spans, "soma-gateway", KIND_PRODUCER, "publish AUDIT")
    assert server in _ancestors(audit_publish, by_id)
    audit_ingest = _one(spans, "soma-audit", KIND_CONSUMER, "process audit-writer")
    assert audit_ingest.parent_id == audit_publish.span_id

    # The trace id is in the audit event of the call and in the Gateway's log lines.
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    for _ in range(100):
        listed = await audit.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(
                filter=audit_pb2.AuditEventFilter(method=SEND, resource=sent.name)
            )
        )
        if listed.audit_events:
            break
        await asyncio.sleep(0.2)
    assert [e.trace_id for e in listed.audit_events] == [trace_id]
    logs = "".join(
        p.read_text(errors="replace") for p in (mesh.data_dir / "logs").glob("gateway-*.log")
    )
    assert f"trace={trace_id}] services.common.interceptors: {SEND} OK" in logs
    worker_log = (mesh.data_dir / "logs" / "worker.log").read_text(errors="replace")
    assert f"trace={trace_id}]" in worker_log and message_id in worker_log


async def test_health_probes_make_no_traces(
    trace_collector: TraceCollector, mesh: MeshRunner
) -> None:
    """Envoy and the supervisor probe every replica each second: none of that is traced, and
    nor are the poll loops' queries (only the requests and messages themselves are)."""
    await asyncio.sleep(2.0)  # several probe rounds
    spans = trace_collector.spans()
    assert not [s for s in spans if "grpc.health" in s.name]
    bare_queries = [s for s in spans if s.kind == KIND_CLIENT and not s.parent_id]
    assert not bare_queries, bare_queries[:3]
