"""The Audit service in-process against real PostgreSQL and NATS JetStream (and OpenBao, which
every service's authenticator opens).

Infrastructure comes from the mesh supervisor's Python API (no Python parts, no Envoy). The
servicer runs here with the real error interceptor and a test-only stand-in for authentication:
`x-test-principal: <json>` sets the caller, for unary and streaming calls. Events are published
the way emitters publish them (binary AuditEvent, subject `audit.<tenant>.<service>`,
`Nats-Msg-Id` = event id).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, json_format
from grpc import aio

from services.audit.app import AuditSettings, open_audit
from services.common.audit import chain
from services.common.audit.event import subject_for
from services.common.auth.principal import Principal, current_principal
from services.common.config import load_config
from services.common.events import Bus
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    build_interceptors,
    wrap_handler,
)
from services.common.runtime import open_runtime
from services.common.server import RunningServer, create_server
from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.audit.v1 import resources_pb2 as pb

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class FakePrincipalInterceptor(WrappingInterceptor):
    """Test only: the caller from `x-test-principal`, for every call shape."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def principal(context: aio.ServicerContext) -> Principal | None:
            for item in context.invocation_metadata() or ():
                if item.key == "x-test-principal":
                    data = json.loads(item.value)
                    return Principal(
                        subject=data["subject"],
                        tenant=data["tenant"],
                        roles=frozenset(data["roles"]),
                        scopes=frozenset(["*"]),
                        credential="api_key",
                    )
            return None

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                token = current_principal.set(principal(context))
                try:
                    return await behavior(request, context)
                finally:
                    current_principal.reset(token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                token = current_principal.set(principal(context))
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    current_principal.reset(token)

            return call

        return wrap_handler(handler, around_unary, around_stream)


@dataclass
class AuditEnv:
    stub: audit_pb2_grpc.AuditServiceStub
    bus: Bus
    pool: asyncpg.Pool
    env: dict[str, str]
    base: Path


def who(tenant: str, *roles: str, subject: str = "user:root") -> tuple[tuple[str, str], ...]:
    body = {"tenant": tenant, "roles": list(roles), "subject": subject}
    return (("x-test-principal", json.dumps(body)),)


@pytest.fixture(scope="session")
async def audit_env() -> AsyncIterator[AuditEnv]:
    from services.mesh import Mesh, MeshOptions

    base = Path(tempfile.mkdtemp(prefix="soma-audit-it-", dir="/tmp"))
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "NATS_URL", "VAULT_ADDR", "VAULT_TOKEN"}
    }
    environ["SOMA_MESH_BOOTSTRAP"] = "0"
    mesh = Mesh(
        MeshOptions(
            data_dir=base / "data",
            port=0,
            admin_port=0,
            modules={"*": ""},
            with_envoy=False,
            environ=environ,
        )
    )
    await mesh.start()
    server: RunningServer | None = None
    try:
        env = {
            "DATABASE_URL": mesh.state.database_url,
            "NATS_URL": mesh.state.nats_url,
            "VAULT_ADDR": mesh.state.vault_addr,
            "VAULT_TOKEN": mesh.vault_token,
            "SOMA_PORT": "0",
            "SOMA_DATA_DIR": str(base / "data"),
        }
        config = load_config("audit", env)
        runtime = await open_runtime(config, env, asyncio.Event())
        parts = await open_audit(runtime, AuditSettings(batch=500, purge_interval=3600))
        server = await create_server(
            config,
            parts.service_names,
            parts.register,
            build_interceptors(authn=FakePrincipalInterceptor()),
        )
        await server.set_serving(True)
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            yield AuditEnv(stub, runtime.bus, runtime.pool, {**environ, **env}, base)
        await server.server.stop(1)
        await parts.close()
        await runtime.close()
    finally:
        if server is not None:
            await server.server.stop(0)
        await mesh.stop()
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


# -- helpers -----------------------------------------------------------------------------------


def tenant_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


def make_event(
    tenant: str,
    *,
    method: str = "/soma.keys.v1.KeysService/CreateApiKey",
    subject: str = "key:k1",
    resource: str = "keys/k1",
    decision: int = pb.AUDIT_DECISION_ALLOW,
    status: int = 0,
    when: datetime | None = None,
    request_id: str = "",
) -> pb.AuditEvent:
    event = pb.AuditEvent(
        name=f"auditEvents/{uuid.uuid4()}",
        tenant=tenant,
        actor=pb.AuditActor(subject=subject, tenant=tenant, key_id=subject.split(":")[-1]),
        client_address="127.0.0.1:4000",
        method=method,
        resource=resource,
        decision=decision,  # type: ignore[arg-type]
        decision_reason="test",
        status_code=status,  # type: ignore[arg-type]
        request_id=request_id or str(uuid.uuid4()),
    )
    event.event_time.FromDatetime(when or datetime.now(UTC))
    return event


async def publish(env: AuditEnv, events: list[pb.AuditEvent], msg_id: str | None = None) -> None:
    for event in events:
        await env.bus.js.publish(
            subject_for(event),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": msg_id or event.name.split("/")[1]},
        )


async def head(env: AuditEnv, tenant: str) -> int:
    value = await env.pool.fetchval(
        "SELECT sequence FROM audit_chain_heads WHERE tenant = $1", tenant
    )
    return int(value or 0)


async def wait_head(env: AuditEnv, tenant: str, sequence: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while (current := await head(env, tenant)) < sequence:
        assert time.monotonic() < deadline, f"head of {tenant} stuck at {current} < {sequence}"
        await asyncio.sleep(0.05)


async def seeded(env: AuditEnv, n: int, **kw: Any) -> tuple[str, list[pb.AuditEvent]]:
    tenant = tenant_id()
    events = [make_event(tenant, **kw) for _ in range(n)]
    await publish(env, events)
    await wait_head(env, tenant, n)
    return tenant, events


async def fails(call: Awaitable[Any], code: grpc.StatusCode) -> str:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def verify(env: AuditEnv, tenant: str, **kw: Any) -> audit_pb2.VerifyAuditChainResponse:
    return await env.stub.VerifyAuditChain(
        audit_pb2.VerifyAuditChainRequest(tenant=tenant, **kw),
        metadata=who("platform", "platform_admin"),
    )


async def list_all(
    env: AuditEnv, tenant: str, page_size: int = 0, **filters: Any
) -> list[pb.AuditEvent]:
    out: list[pb.AuditEvent] = []
    token = ""
    order = filters.pop("order", 0)
    while True:
        response = await env.stub.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(
                page_size=page_size,
                page_token=token,
                order=order,
                filter=audit_pb2.AuditEventFilter(**filters),
            ),
            metadata=who(tenant, "auditor"),
        )
        out.extend(response.audit_events)
        token = response.next_page_token
        if not token:
            return out


# -- ingest, dedupe, chain ---------------------------------------------------------------------


async def test_ingest_chains_every_event_once(audit_env: AuditEnv) -> None:
    tenant, events = await seeded(audit_env, 30)
    stored = await list_all(audit_env, tenant, page_size=7, order=2)
    assert [e.name for e in stored] == [e.name for e in events]  # published order = chain order
    assert [e.sequence for e in stored] == list(range(1, 31))
    assert stored[0].previous_hash == chain.GENESIS
    assert chain.verify(stored) is None
    assert all(e.HasField("ingest_time") for e in stored)
    got = await audit_env.stub.GetAuditEvent(
        audit_pb2.GetAuditEventRequest(name=events[3].name), metadata=who(tenant, "admin")
    )
    assert got == stored[3]
    result = await verify(audit_env, tenant)
    assert result.ok and result.events_verified == 30 and result.head_hash == stored[-1].hash
    assert (result.start_sequence, result.end_sequence) == (1, 30)
    assert result.anchor.sequence == 0 and result.anchor.hash == chain.GENESIS


async def test_redelivered_events_are_not_stored_twice(audit_env: AuditEnv) -> None:
    tenant, events = await seeded(audit_env, 5)
    # Different Nats-Msg-Ids get past JetStream's dedupe: the writer must catch them.
    for event in events:
        await publish(audit_env, [event], msg_id=str(uuid.uuid4()))
    marker = make_event(tenant)
    await publish(audit_env, [marker])
    await wait_head(audit_env, tenant, 6)
    await asyncio.sleep(0.3)
    assert await head(audit_env, tenant) == 6
    count = await audit_env.pool.fetchval(
        "SELECT count(*) FROM audit_events WHERE tenant = $1", tenant
    )
    assert count == 6
    assert (await verify(audit_env, tenant)).ok


async def test_events_without_tenant_chain_under_underscore(audit_env: AuditEnv) -> None:
    event = make_event("", decision=pb.AUDIT_DECISION_DENY, status=16)
    before = await head(audit_env, "_")
    await publish(audit_env, [event])
    await wait_head(audit_env, "_", before + 1)
    got = await audit_env.stub.GetAuditEvent(
        audit_pb2.GetAuditEventRequest(name=event.name), metadata=who("p", "platform_admin")
    )
    assert got.tenant == "_" and got.status_code == 16


# -- queries -----------------------------------------------------------------------------------


async def test_filters_order_and_paging(audit_env: AuditEnv) -> None:
    tenant = tenant_id()
    old = datetime.now(UTC) - timedelta(hours=2)
    events = [
        make_event(tenant, subject="key:alice", resource="keys/a1", when=old),
        make_event(
            tenant,
            subject="key:bob",
            method="/soma.gateway.v1.GatewayService/CreateSession",
            resource="sessions/s1",
        ),
        make_event(tenant, subject="key:bob", decision=pb.AUDIT_DECISION_DENY, status=7),
        make_event(tenant, subject="key:alice", resource="keys/a2", request_id="req-x"),
    ]
    await publish(audit_env, events)
    await wait_head(audit_env, tenant, 4)
    names = [e.name for e in events]

    newest = await list_all(audit_env, tenant)
    assert [e.name for e in newest] == [names[3], names[2], names[1], names[0]]
    oldest = await list_all(audit_env, tenant, page_size=1, order=2)
    assert [e.name for e in oldest] == names

    async def only(**filters: Any) -> list[str]:
        return [e.name for e in await list_all(audit_env, tenant, order=2, **filters)]

    assert await only(actor="key:alice") == [names[0], names[3]]
    assert await only(actor="bob") == [names[1], names[2]]  # the key id
    assert await only(method="/soma.gateway.v1.GatewayService/") == [names[1]]
    assert await only(method="/soma.keys.v1.KeysService/CreateApiKey") == [
        names[0],
        names[2],
        names[3],
    ]
    assert await only(resource="keys/a*") == [names[0], names[3]]
    assert await only(resource="sessions/s1") == [names[1]]
    assert await only(decision=pb.AUDIT_DECISION_DENY) == [names[2]]
    assert await only(status_codes=[0]) == [names[0], names[1], names[3]]
    assert await only(request_id="req-x") == [names[3]]
    start = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    window = audit_pb2.AuditEventFilter()
    window.start_time.FromJsonString(start.replace("+00:00", "Z"))
    assert await only(start_time=window.start_time) == names[1:]

    first = await audit_env.stub.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(page_size=2), metadata=who(tenant, "auditor")
    )
    await fails(
        audit_env.stub.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(
                page_size=2,
                page_token=first.next_page_token,
                filter=audit_pb2.AuditEventFilter(actor="key:bob"),
            ),
            metadata=who(tenant, "auditor"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await fails(
        audit_env.stub.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(page_size=-1), metadata=who(tenant, "auditor")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# -- access ------------------------------------------------------------------------------------


async def test_tenant_scoping(audit_env: AuditEnv) -> None:
    tenant_a, events_a = await seeded(audit_env, 2)
    tenant_b, events_b = await seeded(audit_env, 2)
    stub = audit_env.stub

    for role in ("member", "approver"):
        await fails(
            stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest(), metadata=who(tenant_a, role)),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    await fails(
        stub.ListAuditEvents(audit_pb2.ListAuditEventsRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    own = await list_all(audit_env, tenant_a)
    assert {e.name for e in own} == {e.name for e in events_a}
    other = audit_pb2.AuditEventFilter(tenant=tenant_b)
    await fails(
        stub.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(filter=other), metadata=who(tenant_a, "admin")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        stub.GetAuditEvent(
            audit_pb2.GetAuditEventRequest(name=events_b[0].name), metadata=who(tenant_a, "admin")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        stub.VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(tenant=tenant_b), metadata=who(tenant_a, "auditor")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    export = stub.ExportAuditEvents(
        audit_pb2.ExportAuditEventsRequest(filter=other), metadata=who(tenant_a, "auditor")
    )
    await fails(_drain(export), grpc.StatusCode.NOT_FOUND)
    tail = stub.TailAuditEvents(
        audit_pb2.TailAuditEventsRequest(filter=other), metadata=who(tenant_a, "auditor")
    )
    await fails(_drain(tail), grpc.StatusCode.NOT_FOUND)
    # A platform admin reads any tenant.
    listed = await stub.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(filter=other), metadata=who("platform", "platform_admin")
    )
    assert {e.name for e in listed.audit_events} == {e.name for e in events_b}
    # Only tenant admins change retention.
    await fails(
        stub.UpdateRetentionPolicy(
            audit_pb2.UpdateRetentionPolicyRequest(
                retention_policy=pb.RetentionPolicy(name="retentionPolicy"),
                update_mask=field_mask_pb2.FieldMask(paths=["retention"]),
            ),
            metadata=who(tenant_a, "auditor"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def _drain(call: Any) -> list[Any]:
    return [item async for item in call]


# -- tampering ---------------------------------------------------------------------------------


async def test_an_updated_row_is_named(audit_env: AuditEnv) -> None:
    tenant, _ = await seeded(audit_env, 10)
    await audit_env.pool.execute(
        "UPDATE audit_events SET resource = 'keys/forged' WHERE tenant = $1 AND sequence = 6",
        tenant,
    )
    result = await verify(audit_env, tenant)
    assert not result.ok
    assert result.first_break.sequence == 6
    assert result.first_break.reason == audit_pb2.CHAIN_BREAK_REASON_HASH_MISMATCH
    assert "altered" in result.first_break.message and "resource" in result.first_break.message
    assert (result.end_sequence, result.events_verified) == (5, 5)


async def test_an_altered_payload_is_named(audit_env: AuditEnv) -> None:
    tenant, _ = await seeded(audit_env, 6)
    row = await audit_env.pool.fetchrow(
        "SELECT payload FROM audit_events WHERE tenant = $1 AND sequence = 3", tenant
    )
    event = pb.AuditEvent.FromString(row["payload"])
    event.decision_reason = "nothing to see here"
    await audit_env.pool.execute(
        "UPDATE audit_events SET payload = $2 WHERE tenant = $1 AND sequence = 3",
        tenant,
        event.SerializeToString(),
    )
    result = await verify(audit_env, tenant)
    assert not result.ok and result.first_break.sequence == 3
    assert result.first_break.reason == audit_pb2.CHAIN_BREAK_REASON_HASH_MISMATCH
    assert result.first_break.expected_hash != result.first_break.actual_hash


async def test_a_deleted_row_is_named(audit_env: AuditEnv) -> None:
    tenant, _ = await seeded(audit_env, 8)
    await audit_env.pool.execute(
        "DELETE FROM audit_events WHERE tenant = $1 AND sequence = 4", tenant
    )
    result = await verify(audit_env, tenant)
    assert not result.ok
    assert result.first_break.sequence == 4 and result.first_break.event == ""
    assert result.first_break.reason == audit_pb2.CHAIN_BREAK_REASON_MISSING_EVENT
    # The last event deleted: the head recorded at ingest still knows it existed.
    tenant2, _ = await seeded(audit_env, 3)
    await audit_env.pool.execute(
        "DELETE FROM audit_events WHERE tenant = $1 AND sequence = 3", tenant2
    )
    result = await verify(audit_env, tenant2)
    assert not result.ok and result.first_break.sequence == 3
    assert result.first_break.reason == audit_pb2.CHAIN_BREAK_REASON_MISSING_EVENT
    # A range before the damage still verifies.
    partial = await verify(audit_env, tenant, start_sequence=1, end_sequence=3)
    assert partial.ok and partial.events_verified == 3
    later = await verify(audit_env, tenant, start_sequence=5)
    assert later.ok and later.start_sequence == 5 and later.events_verified == 4


# -- retention ---------------------------------------------------------------------------------


async def test_retention_drops_old_events_and_keeps_a_checkpoint(audit_env: AuditEnv) -> None:
    tenant = tenant_id()
    old = datetime.now(UTC) - timedelta(days=10)
    events = [make_event(tenant, when=old + timedelta(seconds=i)) for i in range(5)]
    events += [make_event(tenant) for _ in range(4)]
    await publish(audit_env, events)
    await wait_head(audit_env, tenant, 9)
    admin = who(tenant, "admin")
    policy = await audit_env.stub.GetRetentionPolicy(
        audit_pb2.GetRetentionPolicyRequest(name="retentionPolicy"), metadata=admin
    )
    assert policy.tenant == tenant and not policy.HasField("retention")
    assert policy.checkpoint.sequence == 0
    fifth_hash = (await list_all(audit_env, tenant, order=2))[4].hash
    await fails(
        audit_env.stub.UpdateRetentionPolicy(
            audit_pb2.UpdateRetentionPolicyRequest(
                retention_policy=pb.RetentionPolicy(
                    name="retentionPolicy", retention=duration_pb2.Duration(seconds=3600)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["retention"]),
            ),
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    updated = await audit_env.stub.UpdateRetentionPolicy(
        audit_pb2.UpdateRetentionPolicyRequest(
            retention_policy=pb.RetentionPolicy(
                name="retentionPolicy", retention=duration_pb2.Duration(seconds=2 * 86400)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["retention"]),
        ),
        metadata=admin,
    )
    assert updated.retention.seconds == 2 * 86400 and updated.HasField("last_purge_time")
    assert updated.checkpoint.sequence == 5 and updated.checkpoint.events_dropped == 5
    assert updated.checkpoint.hash == fifth_hash
    remaining = await list_all(audit_env, tenant, order=2)
    assert [e.sequence for e in remaining] == [6, 7, 8, 9]
    result = await verify(audit_env, tenant)
    assert result.ok and result.events_verified == 4 and result.start_sequence == 6
    assert result.anchor.sequence == 5 and result.anchor.hash == fifth_hash
    # The first retained event no longer continuing from the checkpoint is named as such.
    await audit_env.pool.execute(
        "UPDATE audit_checkpoints SET hash = $2 WHERE tenant = $1", tenant, "c" * 64
    )
    broken = await verify(audit_env, tenant)
    assert not broken.ok and broken.first_break.sequence == 6
    assert broken.first_break.reason == audit_pb2.CHAIN_BREAK_REASON_CHECKPOINT_MISMATCH


# -- export ------------------------------------------------------------------------------------


async def _export(env: AuditEnv, tenant: str, fmt: int) -> tuple[str, bytes]:
    chunks = [
        chunk
        async for chunk in env.stub.ExportAuditEvents(
            audit_pb2.ExportAuditEventsRequest(format=fmt), metadata=who(tenant, "auditor")
        )
    ]
    assert chunks
    return chunks[0].content_type, b"".join(c.data for c in chunks)


async def test_export_verifies_offline(audit_env: AuditEnv) -> None:
    tenant = tenant_id()
    events = [make_event(tenant) for _ in range(1200)]  # more than a scan page
    events.append(make_event(tenant, method="/soma.keys.v1.KeysService/IssueToken"))
    await publish(audit_env, events)
    await wait_head(audit_env, tenant, len(events))
    content_type, body = await _export(audit_env, tenant, audit_pb2.AUDIT_EXPORT_FORMAT_JSON_LINES)
    assert content_type == "application/x-ndjson"
    parsed = [json_format.Parse(line, pb.AuditEvent()) for line in body.decode().splitlines()]
    assert len(parsed) == len(events) and parsed[0].sequence == 1
    assert chain.verify(parsed) is None
    head_hash = (await verify(audit_env, tenant)).head_hash
    assert parsed[-1].hash == head_hash
    from services.client.audit_verify import verify_lines  # `soma audit verify FILE`

    assert verify_lines(body.decode().splitlines()).ok

    content_type, cef = await _export(audit_env, tenant, audit_pb2.AUDIT_EXPORT_FORMAT_CEF)
    lines = cef.decode().splitlines()
    assert content_type.startswith("text/plain") and len(lines) == len(events)
    assert lines[-1].startswith("CEF:0|Soma|Soma Mesh|") and f"cs6={head_hash}" in lines[-1]
    _, ocsf = await _export(audit_env, tenant, audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_API_ACTIVITY)
    records = [json.loads(line) for line in ocsf.decode().splitlines()]
    assert len(records) == len(events) and records[-1]["unmapped"]["hash"] == head_hash
    _, auth = await _export(audit_env, tenant, audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION)
    only = [json.loads(line) for line in auth.decode().splitlines()]
    assert len(only) == 1 and only[0]["class_uid"] == 3002


# -- tail --------------------------------------------------------------------------------------


async def test_tail_replays_then_follows_and_resumes(audit_env: AuditEnv) -> None:
    tenant, _ = await seeded(audit_env, 5)
    call = audit_env.stub.TailAuditEvents(
        audit_pb2.TailAuditEventsRequest(after_sequence=2), metadata=who(tenant, "auditor")
    )
    received: list[pb.AuditEvent] = []

    async def collect(count: int) -> None:
        async for event in call:
            received.append(event)
            if len(received) == count:
                return

    reader = asyncio.create_task(collect(6))
    await asyncio.sleep(0.3)
    assert [e.sequence for e in received] == [3, 4, 5]
    more = [make_event(tenant) for _ in range(3)]
    started = time.monotonic()
    await publish(audit_env, more)
    await asyncio.wait_for(reader, 10)
    assert time.monotonic() - started < 5
    call.cancel()
    assert [e.sequence for e in received] == [3, 4, 5, 6, 7, 8]
    assert [e.name for e in received[3:]] == [e.name for e in more]
    assert chain.verify(received, anchor_sequence=2, anchor_hash=received[0].previous_hash) is None
    # Resume after the last one received: only new events, filtered.
    resumed = audit_env.stub.TailAuditEvents(
        audit_pb2.TailAuditEventsRequest(
            after_sequence=8, filter=audit_pb2.AuditEventFilter(decision=pb.AUDIT_DECISION_DENY)
        ),
        metadata=who(tenant, "auditor"),
    )
    await publish(
        audit_env,
        [make_event(tenant), make_event(tenant, decision=pb.AUDIT_DECISION_DENY, status=7)],
    )
    first = await asyncio.wait_for(resumed.read(), 10)
    assert first.sequence == 10 and first.decision == pb.AUDIT_DECISION_DENY
    resumed.cancel()
    await fails(
        _drain(
            audit_env.stub.TailAuditEvents(
                audit_pb2.TailAuditEventsRequest(after_sequence=99),
                metadata=who(tenant, "auditor"),
            )
        ),
        grpc.StatusCode.OUT_OF_RANGE,
    )


# -- crash safety ------------------------------------------------------------------------------


async def test_kill_9_mid_batch_loses_and_duplicates_nothing(audit_env: AuditEnv) -> None:
    """A separate Audit replica shares the writer consumer with the in-process one; it is
    killed with SIGKILL while batches are in flight, restarted, and every event ends up stored
    and chained exactly once."""
    tenant = tenant_id()
    n = 20_000
    env = {
        **audit_env.env,
        "SOMA_AUDIT_BATCH": "2000",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'gen' / 'python'}",
    }
    log = audit_env.base / "replica.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "services.audit"], cwd=ROOT, env=env, stdout=out, stderr=out
            )

    async def ready(process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b"SOMA_READY audit") < starts:
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the replica did not start"
            await asyncio.sleep(0.1)

    starts = 1
    replica = start()
    try:
        await ready(replica)
        events = [make_event(tenant) for _ in range(n)]
        for event in events:
            await audit_env.bus.js.publish_async(
                subject_for(event),
                event.SerializeToString(),
                headers={"Nats-Msg-Id": event.name.split("/")[1]},
            )
        await audit_env.bus.js.publish_async_completed()
        await wait_head(audit_env, tenant, n // 4)
        replica.kill()  # SIGKILL, with batches in flight
        replica.wait()
        starts = 2
        replica = start()
        await ready(replica)
        await wait_head(audit_env, tenant, n, within=90)
        await asyncio.sleep(0.5)
        assert await head(audit_env, tenant) == n
        counts = await audit_env.pool.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT id) AS ids FROM audit_events "
            "WHERE tenant = $1",
            tenant,
        )
        assert (counts["rows"], counts["ids"]) == (n, n)
        result = await verify(audit_env, tenant)
        assert result.ok and result.events_verified == n
    finally:
        replica.kill()
        replica.wait()
