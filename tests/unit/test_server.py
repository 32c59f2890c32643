"""The shared server bootstrap on a real grpc.aio server (port 0): error mapping, health,
reflection of method symbols, graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.config import load_config
from services.common.errors import NotFound
from services.common.interceptors import STATUS_DETAILS_KEY
from services.common.server import RunningServer, create_server
from services.common.unimplemented import unimplemented_servicer
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb

NAME = "soma.gateway.v1.GatewayService"


class ToyGateway(gateway_pb2_grpc.GatewayServiceServicer):
    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        raise NotFound(f"session {request.name} does not exist")

    async def GetVersion(self, request, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internal detail")

    async def GetHealth(self, request, context):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)
        return pb.Health(status=pb.Health.STATUS_SERVING)

    async def StreamSessionEvents(self, request, context) -> AsyncIterator[pb.SessionEvent]:  # type: ignore[no-untyped-def]
        yield pb.SessionEvent(sequence=1)
        raise NotFound("gone mid-stream")


@pytest.fixture
async def toy() -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    config = load_config("gateway", {"SOMA_PORT": "0"})
    running = await create_server(
        config,
        [NAME],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(ToyGateway(), s),
    )
    await running.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.server.stop(0)


async def test_domain_error_becomes_status_with_error_info(toy) -> None:  # type: ignore[no-untyped-def]
    _, channel = toy
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/x"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    details = dict(raised.value.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "NOT_FOUND"


async def test_bug_becomes_internal_without_internals(toy) -> None:  # type: ignore[no-untyped-def]
    _, channel = toy
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetVersion(
            gateway_pb2.GetVersionRequest(), metadata=(("x-request-id", "req-123"),)
        )
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "req-123" in raised.value.details()
    assert "secret" not in raised.value.details()


async def test_error_in_stream_keeps_earlier_messages(toy) -> None:  # type: ignore[no-untyped-def]
    _, channel = toy
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in stub.StreamSessionEvents(gateway_pb2.StreamSessionEventsRequest()):
            seen.append(event.sequence)
    assert seen == [1]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_of_method_symbols(toy) -> None:  # type: ignore[no-untyped-def]
    _, channel = toy
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", NAME):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(symbol: str) -> reflection_pb2.ServerReflectionResponse:
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)])
        )
        return await anext(aiter(call))

    for symbol in (NAME, f"{NAME}.GetSession"):
        answer = await ask(symbol)
        assert answer.HasField("file_descriptor_response"), symbol
    assert (await ask(f"{NAME}.NoSuchMethod")).HasField("error_response")


async def test_drain_finishes_in_flight_calls(toy) -> None:  # type: ignore[no-untyped-def]
    running, channel = toy
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    in_flight = asyncio.ensure_future(stub.GetHealth(gateway_pb2.GetHealthRequest()))
    await asyncio.sleep(0.1)
    await running.drain_and_stop(5.0)
    assert (await in_flight).status == pb.Health.STATUS_SERVING


async def test_unimplemented_names_method_and_issue() -> None:
    config = load_config("gateway", {"SOMA_PORT": "0"})
    running = await create_server(
        config,
        [NAME],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            unimplemented_servicer(NAME, 99), s
        ),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListSessions(gateway_pb2.ListSessionsRequest())
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "ListSessions" in raised.value.details() and "#99" in raised.value.details()
    await running.server.stop(0)
