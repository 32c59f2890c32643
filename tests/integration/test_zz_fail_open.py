"""A second mesh with the audit channel fail-OPEN (SOMA_AUDIT_FAIL_CLOSED=off): mutations go on
while NATS cannot be reached, and nothing they produced is lost — neither the Gateway's queued
message (its outbox) nor the audit event (the recorder's outbox), both delivered on recovery."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, authed_channel, freeze

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def open_mesh() -> Iterator[MeshRunner]:
    base = Path(tempfile.mkdtemp(prefix="soma-it-open-", dir="/tmp"))
    runner = MeshRunner(base / "data", replicas=1, env={"SOMA_AUDIT_FAIL_CLOSED": "off"})
    try:
        runner.start()
        runner.admin_key = runner.create_key(tenant="default", roles=("admin",))
        yield runner
    finally:
        runner.stop()
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


async def test_message_sent_while_nats_is_frozen_is_delivered_and_audited_later(
    open_mesh: MeshRunner,
) -> None:
    mesh = open_mesh
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
        nats_pid = mesh.part("nats")["pid"]
        freeze(nats_pid)
        try:
            sent = await gw.SendMessage(
                g.SendMessageRequest(
                    parent=session.name, message=pb.Message(content="while frozen")
                ),
                timeout=10,
            )
            assert sent.state == pb.MESSAGE_STATE_QUEUED
        finally:
            os.kill(nats_pid, signal.SIGCONT)
        for _ in range(150):
            listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
            if len(listed.messages) == 2:
                break
            await asyncio.sleep(0.2)
        assert [m.content for m in listed.messages] == ["while frozen", "while frozen"]
        # The publish that timed out may still have reached NATS once it woke up (the worker
        # answered it); the outbox relay then republishes it, deduplicated, and clears it.
        for _ in range(50):
            stats = await gw.GetQueueStats(g.GetQueueStatsRequest())
            if stats.outbox_depth == 0:
                break
            await asyncio.sleep(0.2)
        assert stats.outbox_depth == 0
        listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
        assert len(listed.messages) == 2  # answered once, not twice

        # ... and the mutation's audit event arrived too, exactly once.
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        found: list[audit_pb2.ListAuditEventsResponse] = []
        for _ in range(100):
            page = await audit.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(
                    page_size=50,
                    filter=audit_pb2.AuditEventFilter(
                        method="/soma.gateway.v1.GatewayService/SendMessage"
                    ),
                )
            )
            found = [e for e in page.audit_events if session.name in e.resource]
            if found:
                break
            await asyncio.sleep(0.2)
        assert len(found) == 1, found
    # It really went through the Gateway's outbox (not a publish that happened to get through).
    message_id = sent.name.rsplit("/", 1)[1]
    logs = "".join(p.read_text() for p in (mesh.data_dir / "logs").glob("gateway-*.log"))
    assert f"message {message_id} left in the outbox" in logs
    assert f"outbox: published message {message_id}" in logs
