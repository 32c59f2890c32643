"""The Gateway through Envoy over gRPC: lifecycle, queue, worker, events, bad input."""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from soma.capsule.v1 import capsule_pb2, capsule_pb2_grpc
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb

pytestmark = pytest.mark.integration


def stub(channel: grpc.aio.Channel) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(channel)


async def wait_for_reply(gw, session: str, count: int, within: float = 20.0) -> list[pb.Message]:  # type: ignore[no-untyped-def]
    """The session's agent replies, once there are `count` of them."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        listed = await gw.ListMessages(g.ListMessagesRequest(parent=session, page_size=500))
        replies = [m for m in listed.messages if m.role == pb.MESSAGE_ROLE_AGENT]
        if len(replies) >= count:
            return replies
        assert asyncio.get_running_loop().time() < deadline, f"no reply in {within}s: {listed}"
        await asyncio.sleep(0.2)


async def test_health_over_grpc(channel) -> None:  # type: ignore[no-untyped-def]
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(
        health_pb2.HealthCheckRequest(service="soma.gateway.v1.GatewayService")
    )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    mesh_health = await stub(channel).GetHealth(g.GetHealthRequest())
    assert mesh_health.status == pb.Health.STATUS_SERVING
    assert dict(mesh_health.dependencies) == {
        "postgres": pb.Health.STATUS_SERVING,
        "nats": pb.Health.STATUS_SERVING,
    }
    version = await stub(channel).GetVersion(g.GetVersionRequest())
    assert version.api_version == "v1" and version.version


async def test_session_lifecycle_worker_reply_and_cache(channel) -> None:  # type: ignore[no-untyped-def]
    gw = stub(channel)
    session = await gw.CreateSession(
        g.CreateSessionRequest(session=pb.Session(display_name="lifecycle", labels={"t": "1"}))
    )
    assert session.state == pb.SESSION_STATE_ACTIVE and session.tenant == "default"
    assert session.agent == "reference" and session.name.startswith("sessions/")
    assert (await gw.GetSession(g.GetSessionRequest(name=session.name))) == session

    text = f"the quick brown fox {uuid.uuid4()}"
    first = await gw.SendMessage(
        g.SendMessageRequest(
            parent=session.name, message=pb.Message(content=text, tool="wordcount")
        )
    )
    assert first.state == pb.MESSAGE_STATE_QUEUED and first.role == pb.MESSAGE_ROLE_USER
    [reply] = await wait_for_reply(gw, session.name, 1)
    assert json.loads(reply.content) == {"characters": len(text), "lines": 1, "words": 5}
    assert reply.reply == first.name and not reply.cache_hit

    # Same tool, same input, same tenant: served from the JetStream KV cache.
    await gw.SendMessage(
        g.SendMessageRequest(
            parent=session.name, message=pb.Message(content=text, tool="wordcount")
        )
    )
    replies = await wait_for_reply(gw, session.name, 2)
    assert replies[1].cache_hit and replies[1].content == reply.content

    listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
    answered = [m for m in listed.messages if m.role == pb.MESSAGE_ROLE_USER]
    assert all(m.state == pb.MESSAGE_STATE_ANSWERED for m in answered)

    closed = await gw.CloseSession(g.CloseSessionRequest(name=session.name))
    assert closed.state == pb.SESSION_STATE_CLOSED and closed.HasField("close_time")
    again = await gw.CloseSession(g.CloseSessionRequest(name=session.name))
    assert again.last_event_sequence == closed.last_event_sequence  # closing twice: no-op
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gw.SendMessage(
            g.SendMessageRequest(parent=session.name, message=pb.Message(content="late"))
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "closed" in raised.value.details()

    stats = await gw.GetQueueStats(g.GetQueueStatsRequest())
    assert stats.stream == "SESSIONS" and len(stats.partitions) == 4
    assert stats.tool_cache_hits >= 1 and stats.tool_cache_misses >= 1
    assert stats.tool_cache_entries >= 1
    part = stats.partitions[session.partition]
    assert part.consumer == f"worker-p{session.partition}"
    assert part.stream_messages >= 2 and part.tool_cache_hits >= 1


async def test_idempotent_send_publishes_once(channel) -> None:  # type: ignore[no-untyped-def]
    gw = stub(channel)
    session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
    request_id = str(uuid.uuid4())
    request = g.SendMessageRequest(
        parent=session.name, request_id=request_id, message=pb.Message(content="only once")
    )
    before = (await gw.GetQueueStats(g.GetQueueStatsRequest())).partitions[session.partition]
    first, second = await asyncio.gather(gw.SendMessage(request), gw.SendMessage(request))
    third = await gw.SendMessage(request)
    assert first.name == second.name == third.name
    await wait_for_reply(gw, session.name, 1)
    await asyncio.sleep(0.5)
    after = (await gw.GetQueueStats(g.GetQueueStatsRequest())).partitions[session.partition]
    assert after.stream_messages - before.stream_messages == 1
    listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
    assert [m.role for m in listed.messages] == [pb.MESSAGE_ROLE_USER, pb.MESSAGE_ROLE_AGENT]

    again = await gw.CreateSession(
        g.CreateSessionRequest(session=pb.Session(), request_id=request_id)
    )
    same = await gw.CreateSession(
        g.CreateSessionRequest(session=pb.Session(), request_id=request_id)
    )
    assert again.name == same.name


async def test_stream_events_live_and_resume(channel) -> None:  # type: ignore[no-untyped-def]
    gw = stub(channel)
    session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
    seen: list[pb.SessionEvent] = []
    call = gw.StreamSessionEvents(g.StreamSessionEventsRequest(session=session.name))

    async def read(n: int) -> None:
        async for event in call:
            seen.append(event)
            if len(seen) == n:
                return

    reader = asyncio.ensure_future(read(3))
    await asyncio.sleep(0.3)
    await gw.SendMessage(
        g.SendMessageRequest(parent=session.name, message=pb.Message(content="abc", tool="reverse"))
    )
    await asyncio.wait_for(reader, 20)
    call.cancel()
    assert [e.sequence for e in seen] == [1, 2, 3]
    assert [e.WhichOneof("kind") for e in seen] == [
        "status_change",
        "message_queued",
        "agent_reply",
    ]
    assert seen[2].agent_reply.content == "cba"

    # Disconnected after event 2: resuming replays exactly what was missed, then goes live.
    await gw.CloseSession(g.CloseSessionRequest(name=session.name))
    resumed = [
        e
        async for e in gw.StreamSessionEvents(
            g.StreamSessionEventsRequest(
                session=session.name, after_sequence=2, stop_when_closed=True
            )
        )
    ]
    assert [e.sequence for e in resumed] == [3, 4]
    assert resumed[1].status_change.state == pb.SESSION_STATE_CLOSED

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in gw.StreamSessionEvents(
            g.StreamSessionEventsRequest(session=session.name, after_sequence=99)
        ):
            pass
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_list_sessions_pages(channel) -> None:  # type: ignore[no-untyped-def]
    gw = stub(channel)
    created = [
        (
            await gw.CreateSession(g.CreateSessionRequest(session=pb.Session(display_name=f"p{i}")))
        ).name
        for i in range(5)
    ]
    names: list[str] = []
    token = ""
    while True:
        page = await gw.ListSessions(g.ListSessionsRequest(page_size=2, page_token=token))
        assert len(page.sessions) <= 2
        names += [s.name for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert names.index(created[4]) < names.index(created[0])  # newest first
    assert len(names) == len(set(names)) and set(created) <= set(names)

    await gw.CloseSession(g.CloseSessionRequest(name=created[2]))
    closed = await gw.ListSessions(
        g.ListSessionsRequest(state=pb.SESSION_STATE_CLOSED, page_size=500)
    )
    assert created[2] in [s.name for s in closed.sessions]
    assert all(s.state == pb.SESSION_STATE_CLOSED for s in closed.sessions)
    # A token only continues the query it came from.
    first = await gw.ListSessions(g.ListSessionsRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gw.ListSessions(
            g.ListSessionsRequest(
                page_size=1, page_token=first.next_page_token, state=pb.SESSION_STATE_ACTIVE
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info


@pytest.mark.parametrize(
    ("method", "req", "code", "fragment"),
    [
        ("GetSession", g.GetSessionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "required"),
        (
            "GetSession",
            g.GetSessionRequest(name="sessions/abc"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid name",
        ),
        (
            "GetSession",
            g.GetSessionRequest(name=f"sessions/{uuid.UUID(int=7)}"),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (
            "SendMessage",
            g.SendMessageRequest(
                parent=f"sessions/{uuid.UUID(int=7)}", message=pb.Message(content="x")
            ),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        ("CreateSession", g.CreateSessionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "required"),
        (
            "CreateSession",
            g.CreateSessionRequest(session=pb.Session(agent="No Spaces")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "session.agent",
        ),
        (
            "CreateSession",
            g.CreateSessionRequest(session=pb.Session(), request_id="again"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UUID",
        ),
        (
            "ListSessions",
            g.ListSessionsRequest(page_size=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "negative",
        ),
        (
            "ListSessions",
            g.ListSessionsRequest(state=7),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a SessionState",
        ),
        (
            "ListSessions",
            g.ListSessionsRequest(page_token="garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        ),
    ],
)
async def test_bad_input_gets_precise_codes(channel, method, req, code, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(stub(channel), method)(req)
    assert raised.value.code() == code, raised.value.details()
    assert fragment in raised.value.details()
    assert _error_info(raised.value).domain == "soma.dev"


async def test_message_limits(channel) -> None:  # type: ignore[no-untyped-def]
    gw = stub(channel)
    session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
    for message, fragment in [
        (pb.Message(), "required"),
        (pb.Message(content="x" * (64 * 1024 + 1)), "limit"),
        (pb.Message(content="hi", tool="shell"), "unknown"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gw.SendMessage(g.SendMessageRequest(parent=session.name, message=message))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in raised.value.details()
    # Beyond the gRPC message limit (4 MiB) the server refuses before any handler runs.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await gw.SendMessage(
            g.SendMessageRequest(
                parent=session.name, message=pb.Message(content="x" * (5 * 1024 * 1024))
            )
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_capsule_service_answers_through_envoy(channel) -> None:  # type: ignore[no-untyped-def]
    """The Capsule service is implemented: a list answers, and a server-streaming install of a
    malformed name is refused with INVALID_ARGUMENT (not UNIMPLEMENTED)."""
    stub = capsule_pb2_grpc.CapsuleServiceStub(channel)
    listed = await stub.ListPublisherKeys(capsule_pb2.ListPublisherKeysRequest(page_size=1))
    assert len(listed.publisher_keys) <= 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.InstallCapsule(capsule_pb2.InstallCapsuleRequest(name="nope")):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "capsules/<name>" in raised.value.details()
