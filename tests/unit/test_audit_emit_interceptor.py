"""The audit interceptor and the authn/authz hooks on a real in-process server (fake JetStream):
one event per call, deny events from authz, the fail-closed gate, sampling, metadata."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.common.audit import event as ev
from services.common.audit.interceptor import AuditHooks, AuditInterceptor, annotate
from services.common.audit.outbox import AsyncOutbox, Outbox
from services.common.audit.recorder import AuditRecorder
from services.common.audit.settings import AuditConfig
from services.common.auth.authz import AuthzInterceptor, PolicyEngine
from services.common.auth.principal import Principal, current_principal
from services.common.config import load_config
from services.common.contract import SERVICES
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.interceptors import build_interceptors
from services.common.server import create_server
from soma.audit.v1 import resources_pb2 as pb
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gw

from .test_audit_emit_recorder import FakeJetStream

TRACE = "0af7651916cd43dd8448eb211c80319c"
GW = "/soma.gateway.v1.GatewayService/"


class FakeAuthn(aio.ServerInterceptor):
    """`x-test-roles: member` becomes a principal of tenant acme."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        roles = dict(details.invocation_metadata or ()).get("x-test-roles")
        current_principal.set(
            None
            if roles is None
            else Principal(
                subject="key:k1",
                tenant="acme",
                roles=frozenset(roles.split(",")),
                scopes=frozenset({"*"}),
                credential="api_key",
                key_id="k1",
            )
        )
        return await continuation(details)


class Toy(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.sent = 0

    async def GetSession(self, request: Any, context: Any) -> gw.Session:
        if request.name == "sessions/other":
            raise PermissionDenied("not your tenant's session")
        return gw.Session(name=request.name)

    async def SendMessage(self, request: Any, context: Any) -> gw.Message:
        self.sent += 1
        annotate(chars=len(request.message.content))
        if request.message.content == "boom":
            raise RuntimeError("bug")
        return gw.Message(name=f"{request.parent}/messages/m1", content="ok")

    async def CreateSession(self, request: Any, context: Any) -> gw.Session:
        return gw.Session(name="sessions/new")

    async def StreamSessionEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield gw.SessionEvent(sequence=1)


class Harness:
    def __init__(self, tmp: Path, sample: float = 1.0) -> None:
        self.js = FakeJetStream()
        config = AuditConfig(publish_timeout=0.1, read_sample=sample, outbox_dir=tmp)
        self.recorder = AuditRecorder(self.js, AsyncOutbox(Outbox(tmp / "t.log")), config)
        self.toy = Toy()
        self.stub: gateway_pb2_grpc.GatewayServiceStub

    async def start(self) -> None:
        hooks = AuditHooks(self.recorder)
        self.recorder.start()
        self.running = await create_server(
            load_config("gateway", {"SOMA_PORT": "0"}),
            [SERVICES["gateway"]],
            lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.toy, s),
            build_interceptors(
                authn=FakeAuthn(),
                authz=AuthzInterceptor(PolicyEngine(), on_deny=hooks.denied),
                audit=AuditInterceptor(self.recorder),
            ),
        )
        self.channel = aio.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def events(self) -> list[pb.AuditEvent]:
        return [ev.decode(p) for p in self.js.payloads]

    async def stop(self) -> None:
        await self.channel.close()
        await self.running.server.stop(0)
        await self.recorder.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.start()
    yield h
    await h.stop()


MEMBER = (("x-test-roles", "member"),)


async def _settle(h: Harness, count: int) -> list[pb.AuditEvent]:
    deadline = time.monotonic() + 3
    while len(h.events()) < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    return h.events()


async def test_allowed_mutation_is_one_event_with_its_outcome(harness: Harness) -> None:
    metadata = (
        *MEMBER,
        ("traceparent", f"00-{TRACE}-b7ad6b7169203331-01"),
        ("x-forwarded-for", "198.51.100.7"),
        ("x-request-id", "req-42"),
    )
    request = gateway_pb2.SendMessageRequest(
        parent="sessions/s1", message=gw.Message(content="hello")
    )
    await harness.stub.SendMessage(request, metadata=metadata)
    request.request_id = "field-id"  # the request's own request_id wins over the header
    await harness.stub.SendMessage(request, metadata=metadata)
    event, second = await _settle(harness, 2)
    assert second.request_id == "field-id"
    assert event.method == GW + "SendMessage"
    assert event.decision == pb.AUDIT_DECISION_ALLOW and event.status_code == 0
    assert event.decision_reason  # the policy's reason
    assert event.resource == "sessions/s1/messages/m1" and event.tenant == "acme"
    assert event.trace_id == TRACE and event.client_address == "198.51.100.7"
    assert event.request_id == "req-42"
    assert event.actor.subject == "key:k1" and event.actor.key_id == "k1"
    assert event.detail["chars"] == "5" and event.detail["parent"] == "sessions/s1"


async def test_failed_mutation_records_the_final_code(harness: Harness) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await harness.stub.SendMessage(
            gateway_pb2.SendMessageRequest(
                parent="sessions/s1", message=gw.Message(content="boom")
            ),
            metadata=MEMBER,
        )
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    [event] = await _settle(harness, 1)
    assert event.status_code == 13 and event.decision == pb.AUDIT_DECISION_ALLOW
    assert event.client_address.startswith("127.0.0.1:")


async def test_policy_denial_is_one_deny_event(harness: Harness) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await harness.stub.SendMessage(
            gateway_pb2.SendMessageRequest(parent="sessions/s1"),
            metadata=(("x-test-roles", "auditor"),),
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    [event] = await _settle(harness, 1)
    assert event.decision == pb.AUDIT_DECISION_DENY and event.status_code == 7
    assert event.decision_reason == raised.value.details()
    assert event.detail["reason"] == "POLICY_DENIED"
    assert harness.toy.sent == 0


async def test_reads_are_recorded_and_handler_refusals_too(harness: Harness) -> None:
    await harness.stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/a"), metadata=MEMBER)
    with pytest.raises(aio.AioRpcError):
        await harness.stub.GetSession(
            gateway_pb2.GetSessionRequest(name="sessions/other"), metadata=MEMBER
        )
    stream = harness.stub.StreamSessionEvents(
        gateway_pb2.StreamSessionEventsRequest(session="sessions/a"), metadata=MEMBER
    )
    assert [e.sequence async for e in stream] == [1]
    events = await _settle(harness, 3)
    by_resource = {(e.method, e.resource): e for e in events}
    assert len(events) == 3
    ok = by_resource[(GW + "GetSession", "sessions/a")]
    assert ok.decision == pb.AUDIT_DECISION_ALLOW and ok.status_code == 0
    refused = by_resource[(GW + "GetSession", "sessions/other")]
    assert refused.decision == pb.AUDIT_DECISION_DENY and refused.status_code == 7
    assert refused.decision_reason == "not your tenant's session"
    assert (GW + "StreamSessionEvents", "sessions/a") in by_resource


async def test_sampled_out_reads_but_never_denials(tmp_path: Path) -> None:
    h = Harness(tmp_path, sample=0.0)
    await h.start()
    try:
        await h.stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/a"), metadata=MEMBER)
        with pytest.raises(aio.AioRpcError):
            await h.stub.GetSession(
                gateway_pb2.GetSessionRequest(name="sessions/other"), metadata=MEMBER
            )
        await asyncio.sleep(0.1)
        assert len(h.js.ids) == 1
    finally:
        await h.stop()


async def test_fail_closed_refuses_mutations_but_serves_reads(harness: Harness) -> None:
    harness.js.up = False
    started = time.monotonic()
    with pytest.raises(aio.AioRpcError) as raised:
        await harness.stub.SendMessage(
            gateway_pb2.SendMessageRequest(parent="sessions/s1"), metadata=MEMBER
        )
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 0.5
    assert harness.toy.sent == 0  # refused before the handler ran
    session = await harness.stub.GetSession(
        gateway_pb2.GetSessionRequest(name="sessions/a"), metadata=MEMBER
    )
    assert session.name == "sessions/a"
    harness.js.up = True
    await harness.stub.SendMessage(
        gateway_pb2.SendMessageRequest(parent="sessions/s1"), metadata=MEMBER
    )
    events = await _settle(harness, 3)  # the refusal and the read came back from the outbox
    codes = sorted((e.method.rsplit("/", 1)[1], e.status_code) for e in events)
    assert codes == [("GetSession", 0), ("SendMessage", 0), ("SendMessage", 14)]
    refused = next(e for e in events if e.status_code == 14)
    assert refused.detail["error_reason"] == "AUDIT_UNAVAILABLE"


class FakeContext:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer soma_dev_leakedsecretvalue0123456789"),)

    def peer(self) -> str:
        return "ipv4:192.0.2.1:4000"


async def test_authentication_failure_hook(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    hooks = AuditHooks(h.recorder)
    error = Unauthenticated("invalid API key", reason="CREDENTIALS_INVALID")
    await hooks.unauthenticated(GW + "SendMessage", error, FakeContext())  # type: ignore[arg-type]
    [event] = h.events()
    assert event.decision == pb.AUDIT_DECISION_DENY and event.status_code == 16
    assert event.decision_reason == "invalid API key" and event.actor == pb.AuditActor()
    assert event.client_address == "192.0.2.1:4000" and event.tenant == ""
    assert event.detail["reason"] == "CREDENTIALS_INVALID"
    assert b"leakedsecret" not in h.js.payloads[0]
    await h.recorder.close()
