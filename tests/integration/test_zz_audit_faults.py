"""Nothing acknowledged goes unaudited: faults during bursts of mutations, through Envoy.

Runs late (it kills NATS and the Audit replicas of the shared mesh; the supervisor restarts
them). Each test uses a tenant of its own, so counting its events is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import grpc
import pytest

from soma.audit.v1 import audit_pb2 as a
from soma.audit.v1 import audit_pb2_grpc
from soma.audit.v1 import resources_pb2 as apb
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gpb
from soma.keys.v1 import keys_pb2 as k
from soma.keys.v1 import keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as kpb
from tests.integration.harness import MeshRunner, authed_channel, freeze

pytestmark = pytest.mark.integration

CREATE_KEY = "/soma.keys.v1.KeysService/CreateApiKey"


async def burst(mesh: MeshRunner, secret: str, total: int, during) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """`total` key creations from 16 concurrent clients; `during()` runs a third of the way in.
    Returns (succeeded, failed)."""
    ok = failed = 0
    started = 0
    lock = asyncio.Lock()
    fault = asyncio.Event()

    async def client(channel: grpc.aio.Channel) -> None:
        nonlocal ok, failed, started
        keys = keys_pb2_grpc.KeysServiceStub(channel)
        while True:
            async with lock:
                if started >= total:
                    return
                started += 1
                if started == total // 3:
                    fault.set()
            try:
                await keys.CreateApiKey(
                    k.CreateApiKeyRequest(api_key=kpb.ApiKey(display_name="burst")), timeout=10
                )
                ok += 1
            except grpc.aio.AioRpcError:
                failed += 1

    async with authed_channel(mesh.grpc_target, secret) as channel:
        clients = [asyncio.ensure_future(client(channel)) for _ in range(16)]
        await fault.wait()
        during()
        await asyncio.gather(*clients)
    return ok, failed


async def list_events(
    audit: audit_pb2_grpc.AuditServiceStub, token: str
) -> a.ListAuditEventsResponse:
    return await audit.ListAuditEvents(
        a.ListAuditEventsRequest(
            page_size=500,
            page_token=token,
            filter=a.AuditEventFilter(method=CREATE_KEY, decision=apb.AUDIT_DECISION_ALLOW),
        ),
        timeout=10,
    )


async def audited_creations(mesh: MeshRunner, secret: str, expected: int, within: float) -> int:
    """Counts the tenant's CreateApiKey events with status OK, waiting for ingest to settle."""
    deadline = time.monotonic() + within
    async with authed_channel(mesh.grpc_target, secret) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            seen, token = set(), ""
            while True:
                try:
                    page = await list_events(audit, token)
                except grpc.aio.AioRpcError as error:
                    # Restarted replicas are healthy to the supervisor a moment before Envoy's
                    # next health check agrees ("no healthy upstream"): ask again.
                    if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
                    continue
                seen |= {e.name for e in page.audit_events if e.status_code == 0}
                token = page.next_page_token
                if not token:
                    break
            if len(seen) >= expected or time.monotonic() > deadline:
                return len(seen)
            await asyncio.sleep(0.5)


async def wait_healthy(mesh: MeshRunner, names: list[str], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(mesh.part(n)["status"] == "healthy" for n in names):
            return
        await asyncio.sleep(0.25)
    raise AssertionError({n: mesh.part(n)["status"] for n in names})


async def test_nats_killed_during_a_burst_loses_no_audit_event(mesh: MeshRunner) -> None:
    secret = mesh.create_key(tenant="audit-faults-nats", roles=("admin",))
    victim = mesh.part("nats")["pid"]
    ok, failed = await burst(mesh, secret, 1000, lambda: os.kill(victim, signal.SIGKILL))
    await wait_healthy(mesh, ["nats"])
    assert ok > 300, (ok, failed)  # most went through; those during the outage were refused
    # every creation the client saw succeed has exactly one event: none lost, none doubled
    assert await audited_creations(mesh, secret, ok, within=60) == ok


async def test_audit_service_killed_mid_batch_loses_no_event(mesh: MeshRunner) -> None:
    secret = mesh.create_key(tenant="audit-faults-writer", roles=("admin",))
    victims = [mesh.part(f"audit-{i}")["pid"] for i in range(mesh.replicas)]

    def kill_writers() -> None:
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    ok, failed = await burst(mesh, secret, 1000, kill_writers)
    await wait_healthy(mesh, [f"audit-{i}" for i in range(mesh.replicas)])
    assert failed == 0, failed  # the Audit service is not on the path of a mutation
    assert await audited_creations(mesh, secret, ok, within=60) == ok


async def test_fail_closed_refuses_mutations_fast_and_keeps_reads(mesh: MeshRunner) -> None:
    nats_pid = mesh.part("nats")["pid"]
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        await gw.ListSessions(g.ListSessionsRequest(page_size=1))
        freeze(nats_pid)  # hung, not dead: the worst case for an audit device
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await gw.CreateSession(g.CreateSessionRequest(session=gpb.Session()), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit" in raised.value.details().lower()
            assert time.monotonic() - started < 3.0
            listed = await gw.ListSessions(g.ListSessionsRequest(page_size=1), timeout=10)
            assert listed is not None
        finally:
            with contextlib.suppress(ProcessLookupError):  # the supervisor may have replaced it
                os.kill(nats_pid, signal.SIGCONT)
    await wait_healthy(mesh, ["nats"])
