"""Queue and database guarantees, checked against the mesh's own NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import nats
import pytest

from services.common.db import MigrationError, migrate
from services.gateway import queue
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, authed_channel

pytestmark = pytest.mark.integration


async def test_redelivered_message_is_answered_once(mesh: MeshRunner) -> None:
    """A worker that crashed after publishing its reply but before acking sees the message
    again; the reply's Nats-Msg-Id and the Gateway's idempotent store keep one answer."""
    state = mesh.state() or {}
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
        sent = await gw.SendMessage(
            g.SendMessageRequest(parent=session.name, message=pb.Message(content="once"))
        )
        nc = await nats.connect(state["nats_url"])
        try:
            job = queue.Job(
                message_id=sent.name.rsplit("/", 1)[1],
                session_id=session.name.split("/", 1)[1],
                tenant=session.tenant,
                partition=session.partition,
                tool="echo",
                content="once",
            )
            # The same job stored again under another msg id: delivered to the worker twice.
            await nc.jetstream().publish(
                queue.inbound_subject(job.partition, job.session_id),
                job.encode(),
                headers={"Nats-Msg-Id": f"again-{uuid.uuid4()}"},
            )
        finally:
            await nc.close()
        for _ in range(100):
            listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
            if len(listed.messages) >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # give a duplicate every chance to arrive
        listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
        assert [m.role for m in listed.messages] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_AGENT]
        again = await gw.GetSession(g.GetSessionRequest(name=session.name))
        assert again.last_event_sequence == 3  # created, queued, one reply
    # The worker really did answer it twice; only one answer was kept.
    worker_log = (mesh.data_dir / "logs" / "worker.log").read_text()
    assert worker_log.count(f"answered {job.message_id}") == 2


async def test_migrations_are_idempotent_and_refuse_edited_history(
    mesh: MeshRunner, tmp_path: Path
) -> None:
    state = mesh.state() or {}
    conn = await asyncpg.connect(state["database_url"])
    service = f"test_{uuid.uuid4().hex[:8]}"
    table = f"{service}_things"
    try:
        (tmp_path / "0001_things.sql").write_text(f"CREATE TABLE {table} (id int);")
        assert await migrate(conn, service, tmp_path) == [1]
        assert await migrate(conn, service, tmp_path) == []  # applied once only
        (tmp_path / "0002_more.sql").write_text(f"ALTER TABLE {table} ADD COLUMN name text;")
        assert await migrate(conn, service, tmp_path) == [2]
        (tmp_path / "0001_things.sql").write_text(f"CREATE TABLE {table} (id bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, service, tmp_path)
        (tmp_path / "3_bad.sql").write_text("SELECT 1;")
        with pytest.raises(MigrationError, match="NNNN_description"):
            await migrate(conn, service, tmp_path)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute("DELETE FROM schema_migrations WHERE service = $1", service)
        await conn.close()
