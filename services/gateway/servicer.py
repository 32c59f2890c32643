"""GatewayService: agent sessions and their message queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from importlib import metadata

import nats.errors
from grpc import aio
from nats.js.errors import NotFoundError

from services.common import paging
from services.common.auth.principal import require_principal
from services.common.errors import InvalidArgument, OutOfRange
from services.common.events import Bus
from services.common.names import check_request_id, parse_name
from services.gateway import queue
from services.gateway.relay import Publisher
from services.gateway.store import CLOSED, SessionStore
from services.gateway.tools import DEFAULT_TOOL, TOOLS
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

MAX_CONTENT_BYTES = 64 * 1024
MAX_DISPLAY_NAME = 200
MAX_LABELS = 32
DEFAULT_AGENT = "reference"
_AGENT = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
STREAM_POLL_SECONDS = 1.0
VERSION = metadata.version("soma-mesh")  # read once: importlib.metadata costs ~85 µs a call


def _validate_session(session: pb.Session) -> None:
    violations = []
    if len(session.display_name) > MAX_DISPLAY_NAME:
        violations.append(("session.display_name", f"at most {MAX_DISPLAY_NAME} characters"))
    if session.agent and not _AGENT.match(session.agent):
        violations.append(
            (
                "session.agent",
                "lowercase letters, digits and '-', starting with a letter, at most 63 characters",
            )
        )
    if len(session.labels) > MAX_LABELS:
        violations.append(("session.labels", f"at most {MAX_LABELS} labels"))
    for key, value in session.labels.items():
        if not _LABEL_KEY.match(key):
            violations.append(
                (
                    f"session.labels[{key[:63]!r}]",
                    "keys are lowercase, start with a letter, at most 63 characters of [a-z0-9_.-]",
                )
            )
        if len(value) > 63:
            violations.append((f"session.labels[{key[:63]!r}]", "values are at most 63 characters"))
    if violations:
        raise InvalidArgument(
            "invalid session: " + "; ".join(f"{f}: {d}" for f, d in violations),
            violations=violations,
        )


def _validate_message(message: pb.Message) -> str:
    """Returns the tool to run."""
    if not message.content:
        raise InvalidArgument(
            "message.content is required and must not be empty", field="message.content"
        )
    size = len(message.content.encode())
    if size > MAX_CONTENT_BYTES:
        raise InvalidArgument(
            f"message.content is {size} bytes; the limit is {MAX_CONTENT_BYTES} bytes "
            "(split it into several messages)",
            field="message.content",
            reason="MESSAGE_TOO_LARGE",
        )
    tool = message.tool or DEFAULT_TOOL
    if tool not in TOOLS:
        raise InvalidArgument(
            f"message.tool {message.tool[:64]!r} is unknown; use one of {', '.join(sorted(TOOLS))}",
            field="message.tool",
        )
    return tool


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        bus: Bus,
        publisher: Publisher,
        partitions: int,
        replica: str,
        draining: asyncio.Event,
    ) -> None:
        self.store = store
        self.bus = bus
        self.publisher = publisher
        self.partitions = partitions
        self.replica = replica
        self.draining = draining

    def tenant(self, context: aio.ServicerContext) -> str:
        # Set by the authentication interceptor; every query below is scoped by it.
        return require_principal().tenant

    async def CreateSession(
        self, request: gateway_pb2.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.Session:
        if not request.HasField("session"):
            raise InvalidArgument("session is required (it may be empty: {})", field="session")
        _validate_session(request.session)
        session, _ = await self.store.create_session(
            tenant=self.tenant(context),
            display_name=request.session.display_name,
            agent=request.session.agent or DEFAULT_AGENT,
            labels=request.session.labels,
            partition_for=lambda sid: queue.partition_of(sid, self.partitions),
            request_id=check_request_id(request.request_id),
        )
        return session

    async def GetSession(
        self, request: gateway_pb2.GetSessionRequest, context: aio.ServicerContext
    ) -> pb.Session:
        session_id = parse_name(request.name, "sessions", "name")
        return await self.store.get_session(self.tenant(context), session_id)

    async def ListSessions(
        self, request: gateway_pb2.ListSessionsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListSessionsResponse:
        if request.state not in pb.SessionState.values():
            raise InvalidArgument(
                f"state {request.state} is not a SessionState; use SESSION_STATE_ACTIVE or "
                "SESSION_STATE_CLOSED, or leave it unset for all",
                field="state",
            )
        limit = paging.page_size(request.page_size)
        query = {"method": "ListSessions", "state": int(request.state)}
        position = paging.decode_token(request.page_token, query)
        sessions, last_pos = await self.store.list_sessions(
            self.tenant(context),
            int(request.state),
            int(position["pos"]) if position else None,
            limit,
        )
        token = paging.encode_token({"pos": last_pos}, query) if last_pos is not None else ""
        return gateway_pb2.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def CloseSession(
        self, request: gateway_pb2.CloseSessionRequest, context: aio.ServicerContext
    ) -> pb.Session:
        session_id = parse_name(request.name, "sessions", "name")
        check_request_id(request.request_id)  # closing twice is harmless; the id is validated
        session, seq = await self.store.close_session(self.tenant(context), session_id)
        if seq:
            await self.publisher.nudge(session_id)
        return session

    async def SendMessage(
        self, request: gateway_pb2.SendMessageRequest, context: aio.ServicerContext
    ) -> pb.Message:
        session_id = parse_name(request.parent, "sessions", "parent")
        if not request.HasField("message"):
            raise InvalidArgument('message is required, e.g. {"content": "hello"}', field="message")
        tool = _validate_message(request.message)
        sent = await self.store.add_user_message(
            tenant=self.tenant(context),
            session_id=session_id,
            content=request.message.content,
            tool=tool,
            request_id=check_request_id(request.request_id),
        )
        if sent.created:
            await self.publisher.nudge(session_id)
        if not sent.published:
            # New, or a repeat of a send whose publish failed: JetStream's dedupe on the
            # message id makes a second publish of the same message harmless.
            job = queue.Job(
                message_id=sent.message.name.rsplit("/", 1)[1],
                session_id=session_id,
                tenant=sent.tenant,
                partition=sent.partition,
                tool=tool,
                content=request.message.content if sent.created else sent.message.content,
            )
            await self.publisher.publish(job)
        return sent.message

    async def ListMessages(
        self, request: gateway_pb2.ListMessagesRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListMessagesResponse:
        session_id = parse_name(request.parent, "sessions", "parent")
        limit = paging.page_size(request.page_size)
        query = {"method": "ListMessages", "session": session_id}
        position = paging.decode_token(request.page_token, query)
        messages, last_pos = await self.store.list_messages(
            self.tenant(context), session_id, int(position["pos"]) if position else None, limit
        )
        token = paging.encode_token({"pos": last_pos}, query) if last_pos is not None else ""
        return gateway_pb2.ListMessagesResponse(messages=messages, next_page_token=token)

    async def StreamSessionEvents(
        self, request: gateway_pb2.StreamSessionEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.SessionEvent]:
        session_id = parse_name(request.session, "sessions", "session")
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence")
        session = await self.store.get_session(self.tenant(context), session_id)
        if request.after_sequence > session.last_event_sequence:
            raise OutOfRange(
                f"after_sequence {request.after_sequence} is beyond the session's last event "
                f"({session.last_event_sequence}); resume from a sequence you received",
                field="after_sequence",
            )
        wake = asyncio.Event()

        async def on_nudge(_msg: object) -> None:
            wake.set()

        # Subscribe before reading, so an event committed in between still wakes us.
        subscription = None
        with contextlib.suppress(nats.errors.Error, OSError):
            subscription = await self.bus.nc.subscribe(
                queue.events_subject(session_id), cb=on_nudge
            )
        last = request.after_sequence
        try:
            while not self.draining.is_set():
                wake.clear()
                events = await self.store.events_after(session_id, last)
                for event in events:
                    last = event.sequence
                    yield event
                if events:
                    continue
                if request.stop_when_closed:
                    current = await self.store.get_session(self.tenant(context), session_id)
                    if current.state == CLOSED and current.last_event_sequence <= last:
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), STREAM_POLL_SECONDS)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        # Draining: end the stream cleanly; the client resumes from `last` on another replica.

    async def GetQueueStats(
        self, request: gateway_pb2.GetQueueStatsRequest, context: aio.ServicerContext
    ) -> pb.QueueStats:
        stats = pb.QueueStats(stream=queue.STREAM)
        info = await self.bus.js.stream_info(queue.STREAM)
        stats.stream_messages = info.state.messages
        stats.stream_bytes = info.state.bytes
        stats.last_sequence = info.state.last_seq
        cache_counts = await self.store.tool_cache_counts()
        for p in range(self.partitions):
            part = stats.partitions.add(partition=p, subject=queue.partition_filter(p))
            subjects = await self.bus.js.stream_info(
                queue.STREAM, subjects_filter=queue.partition_filter(p)
            )
            part.stream_messages = sum((subjects.state.subjects or {}).values())
            with contextlib.suppress(NotFoundError):
                consumer = await self.bus.js.consumer_info(queue.STREAM, queue.worker_consumer(p))
                part.consumer = consumer.name
                part.pending = consumer.num_pending or 0
                part.ack_pending = consumer.num_ack_pending or 0
                part.redelivered = consumer.num_redelivered or 0
                part.delivered_sequence = consumer.delivered.stream_seq or 0
            part.tool_cache_hits, part.tool_cache_misses = cache_counts.get(p, (0, 0))
            stats.tool_cache_hits += part.tool_cache_hits
            stats.tool_cache_misses += part.tool_cache_misses
        with contextlib.suppress(NotFoundError):
            replies = await self.bus.js.consumer_info(queue.STREAM, queue.REPLIES_CONSUMER)
            stats.replies_pending = (replies.num_pending or 0) + (replies.num_ack_pending or 0)
        stats.outbox_depth = await self.store.outbox_depth()
        with contextlib.suppress(Exception):
            kv = await self.bus.js.key_value(queue.TOOL_CACHE_BUCKET)
            stats.tool_cache_entries = (await kv.status()).values
        return stats

    async def GetHealth(
        self, request: gateway_pb2.GetHealthRequest, context: aio.ServicerContext
    ) -> pb.Health:
        health = pb.Health(replica=self.replica)
        serving, not_serving = pb.Health.STATUS_SERVING, pb.Health.STATUS_NOT_SERVING
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            health.dependencies["postgres"] = serving
        except Exception:
            health.dependencies["postgres"] = not_serving
        health.dependencies["nats"] = serving if self.bus.nc.is_connected else not_serving
        ok = all(s == serving for s in health.dependencies.values()) and not self.draining.is_set()
        health.status = serving if ok else not_serving
        return health

    async def GetVersion(
        self, request: gateway_pb2.GetVersionRequest, context: aio.ServicerContext
    ) -> pb.Version:
        return pb.Version(version=VERSION, api_version="v1")
