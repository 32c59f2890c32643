"""The audit recorder against a real NATS JetStream (started here, killed and stopped here):
publish + dedupe, kill -9 during a burst -> outbox -> restart -> every event exactly once, the
fail-closed gate within its bound (NATS dead or hung), and a hung NATS (SIGSTOP) never holding a
call beyond the bound."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.common.audit import event as ev
from services.common.audit.interceptor import AuditHooks, AuditInterceptor
from services.common.audit.recorder import AuditRecorder, JetStreamTransport
from services.common.audit.settings import AuditConfig
from services.common.auth.authz import AuthzInterceptor, PolicyEngine
from services.common.config import NatsConfig, load_config
from services.common.contract import SERVICES
from services.common.events import Bus, connect
from services.common.interceptors import build_interceptors
from services.common.server import create_server
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gw
from tests.integration.harness import freeze
from tests.unit.test_audit_emit_interceptor import MEMBER, FakeAuthn

pytestmark = pytest.mark.integration

BOUND = 0.3  # SOMA_AUDIT_PUBLISH_TIMEOUT_MS for these tests
NATS_BIN = str(Path(sys.executable).parent / "nats-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nats:
    """One nats-server of ours: start, kill -9, stop/continue, restart on the same store."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="soma-audit-emit-"))
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "nats.log", "ab")  # the child keeps it
        self.proc = subprocess.Popen(
            [NATS_BIN, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP, returning once the process is really stopped (delivery is asynchronous)."""
        assert self.proc is not None
        freeze(self.proc.pid)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Nats]:
    server = Nats()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: Nats) -> AsyncIterator[Bus]:
    bus = await connect(NatsConfig((nats_server.url,)), "audit-emit-test")
    yield bus
    await bus.close()


def _config(tmp_path: Path, fail_closed: bool = True) -> AuditConfig:
    return AuditConfig(fail_closed=fail_closed, publish_timeout=BOUND, outbox_dir=tmp_path)


def _event(tenant: str, n: int) -> ev.pb.AuditEvent:
    return ev.build_event(
        method="/soma.keys.v1.KeysService/CreateApiKey",
        principal=None,
        allow=True,
        reason=f"#{n}",
        status_code=grpc.StatusCode.OK,
        call=ev.CallInfo(),
        tenant=tenant,
    )


async def _stored(bus: Bus, tenant: str, expected: int, within: float = 15.0) -> list[str]:
    """Event ids stored under `audit.<tenant>.>`, in stream order (waits for `expected`)."""
    deadline = time.monotonic() + within
    while True:
        ids: list[str] = []
        sub = await bus.js.subscribe(f"audit.{tenant}.>", ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    break
                ids.append(ev.event_id(ev.decode(msg.data)))
                assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == ids[-1]
        finally:
            await sub.unsubscribe()
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.2)


async def _until(predicate, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _wait_connected(bus: Bus) -> None:
    await _until(lambda: bus.nc.is_connected)


async def test_publish_and_dedupe(bus: Bus, tmp_path: Path) -> None:
    recorder = await AuditRecorder.open(bus, _config(tmp_path), "dedupe-0")
    recorder2 = await AuditRecorder.open(bus, _config(tmp_path), "dedupe-1")  # idempotent stream
    tenant = f"t{uuid.uuid4().hex[:8]}"
    events = [_event(tenant, i) for i in range(20)]
    assert all(await asyncio.gather(*(recorder.record(e) for e in events)))
    transport = JetStreamTransport(bus.nc, bus.js)
    for e in events[:5]:  # a retried publish of the same event is stored once
        await transport.publish(ev.subject_for(e), ev.encode(e), ev.event_id(e), BOUND)
    ids = await _stored(bus, tenant, 20)
    assert sorted(ids) == sorted(ev.event_id(e) for e in events)
    await recorder.close()
    await recorder2.close()


async def test_kill_nats_during_a_burst_every_event_exactly_once(
    nats_server: Nats, bus: Bus, tmp_path: Path
) -> None:
    recorder = await AuditRecorder.open(bus, _config(tmp_path, fail_closed=False), "burst-0")
    tenant = f"t{uuid.uuid4().hex[:8]}"
    events = [_event(tenant, i) for i in range(1500)]
    queue = iter(events)
    killed = asyncio.Event()

    async def client() -> None:
        for e in queue:
            await recorder.record(e)
            await asyncio.sleep(0)

    async def killer() -> None:
        await _until(lambda: recorder.published >= 300)
        nats_server.kill()
        killed.set()

    await asyncio.gather(*(client() for _ in range(20)), killer())
    assert killed.is_set() and recorder.outboxed > 0
    tail = [_event(tenant, 2000 + i) for i in range(100)]
    for e in tail:  # sequential, while NATS is down: order is defined
        assert await recorder.record(e) is False
    nats_server.start()  # same store dir, same port
    await _wait_connected(bus)
    await _until(lambda: recorder.outbox.pending == 0, within=30)
    ids = await _stored(bus, tenant, len(events) + len(tail))
    expected = [ev.event_id(e) for e in events + tail]
    assert len(ids) == len(set(ids)) == len(expected)  # none duplicated
    assert set(ids) == set(expected)  # none lost
    assert [i for i in ids if i in {ev.event_id(e) for e in tail}] == expected[-100:]  # in order
    await recorder.close()


async def _gateway(
    recorder: AuditRecorder, hold: asyncio.Event | None = None
) -> tuple[object, gateway_pb2_grpc.GatewayServiceStub]:
    class Toy(gateway_pb2_grpc.GatewayServiceServicer):
        async def SendMessage(self, request, context):  # type: ignore[no-untyped-def]
            if hold is not None and request.parent == "sessions/held":
                await hold.wait()  # the test freezes NATS while the handler runs
            return gw.Message(name=f"{request.parent}/messages/m1")

        async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
            return gw.Session(name=request.name)

    hooks = AuditHooks(recorder)
    running = await create_server(
        load_config("gateway", {"SOMA_PORT": "0"}),
        [SERVICES["gateway"]],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Toy(), s),
        build_interceptors(
            authn=FakeAuthn(),
            authz=AuthzInterceptor(PolicyEngine(), on_deny=hooks.denied),
            audit=AuditInterceptor(recorder),
        ),
    )
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    return (running, channel), gateway_pb2_grpc.GatewayServiceStub(channel)


async def _close(handle: object) -> None:
    running, channel = handle  # type: ignore[misc]
    await channel.close()
    await running.server.stop(0)


def _send(tenant_session: str) -> gateway_pb2.SendMessageRequest:
    return gateway_pb2.SendMessageRequest(parent=tenant_session, message=gw.Message(content="x"))


async def test_fail_closed_refuses_mutations_within_the_bound(
    nats_server: Nats, bus: Bus, tmp_path: Path
) -> None:
    recorder = await AuditRecorder.open(bus, _config(tmp_path), "closed-0")
    handle, stub = await _gateway(recorder)
    try:
        await stub.SendMessage(_send("sessions/a"), metadata=MEMBER)
        nats_server.kill()
        await _until(lambda: not bus.nc.is_connected, within=5)
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.SendMessage(_send("sessions/a"), metadata=MEMBER)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < BOUND + 0.2
            read = await stub.GetSession(
                gateway_pb2.GetSessionRequest(name="sessions/a"), metadata=MEMBER
            )
            assert read.name == "sessions/a"  # reads keep working
        nats_server.start()
        await _wait_connected(bus)
        await _until(lambda: recorder.outbox.pending == 0)
        await stub.SendMessage(_send("sessions/a"), metadata=MEMBER)  # open again
    finally:
        await _close(handle)
        await recorder.close()


async def test_a_hung_nats_never_holds_a_call_beyond_the_bound(
    nats_server: Nats, bus: Bus, tmp_path: Path
) -> None:
    recorder = await AuditRecorder.open(bus, _config(tmp_path), "hung-0")
    hold = asyncio.Event()
    handle, stub = await _gateway(recorder, hold)
    try:
        await stub.SendMessage(_send("sessions/h"), metadata=MEMBER)
        # A mutation past the gate when NATS hangs: its event times out into the outbox, and
        # the call still answers OK within one bound (plus an fsync).
        held = asyncio.ensure_future(stub.SendMessage(_send("sessions/held"), metadata=MEMBER))
        await asyncio.sleep(0.2)
        nats_server.pause()
        durations, codes = [], []
        try:
            started = time.monotonic()
            hold.set()
            await held
            held_took = time.monotonic() - started
            # Then every mutation is refused within the bound; reads keep working.
            for _ in range(6):
                started = time.monotonic()
                try:
                    await stub.SendMessage(_send("sessions/h"), metadata=MEMBER)
                    codes.append(grpc.StatusCode.OK)
                except aio.AioRpcError as error:
                    codes.append(error.code())
                durations.append(time.monotonic() - started)
                read = await stub.GetSession(
                    gateway_pb2.GetSessionRequest(name="sessions/h"), metadata=MEMBER
                )
                assert read.name == "sessions/h"
        finally:
            nats_server.resume()
        assert held_took < BOUND + 0.3, held_took
        assert recorder.outboxed >= 1
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
        assert max(durations) < BOUND + 0.2, durations
        await _until(lambda: recorder.outbox.pending == 0)
        await asyncio.sleep(BOUND)  # a failed probe is not repeated at once
        await stub.SendMessage(_send("sessions/h"), metadata=MEMBER)
    finally:
        await _close(handle)
        await recorder.close()
