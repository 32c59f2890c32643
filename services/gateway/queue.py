"""The session queue on JetStream: subjects, partitions, stream and consumer definitions.

    sessions.<partition>.<session id>.in    user messages, for agent workers
    sessions.<partition>.<session id>.out   worker replies, for the Gateway
    gateway.events.<session id>             core-NATS nudge: "this session has new events"

One stream (SESSIONS) holds both directions. Each partition has one durable pull consumer
(`worker-p<N>`) shared by however many workers serve it; the Gateway replicas share one durable
consumer (`gateway-replies`) for the replies. Payloads are small JSON documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError

from services.common.events import ensure_stream

STREAM = "SESSIONS"
REPLIES_CONSUMER = "gateway-replies"
TOOL_CACHE_BUCKET = "tool-cache"
MAX_DELIVER = 10
ACK_WAIT_SECONDS = 30.0


def partition_of(session_id: str, partitions: int) -> int:
    """A stable hash (not Python's salted `hash`), so every process agrees."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def inbound_subject(partition: int, session_id: str) -> str:
    return f"sessions.{partition}.{session_id}.in"


def reply_subject(partition: int, session_id: str) -> str:
    return f"sessions.{partition}.{session_id}.out"


def partition_filter(partition: int) -> str:
    return f"sessions.{partition}.*.in"


def events_subject(session_id: str) -> str:
    return f"gateway.events.{session_id}"


def worker_consumer(partition: int) -> str:
    return f"worker-p{partition}"


def reply_msg_id(message_id: str) -> str:
    return f"reply-{message_id}"


@dataclass(frozen=True)
class Job:
    """A user message as a worker sees it."""

    message_id: str
    session_id: str
    tenant: str
    partition: int
    tool: str
    content: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Job:
        return cls(**json.loads(data))


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one Job."""

    message_id: str
    session_id: str
    tenant: str
    partition: int
    tool: str
    content: str
    cache_hit: bool
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        return cls(**json.loads(data))


STREAM_CONFIG = StreamConfig(
    name=STREAM,
    subjects=["sessions.>"],
    retention=RetentionPolicy.LIMITS,
    max_age=7 * 24 * 3600,  # history for debugging; the database is the record
    duplicate_window=120,  # Nats-Msg-Id dedupe window for retried publishes (seconds)
)


async def ensure_queue(js: JetStreamContext, partitions: int) -> None:
    """Declares the stream and every consumer, so messages queued before a worker starts
    are counted as pending rather than invisible."""
    await ensure_stream(js, STREAM_CONFIG)
    configs = [
        ConsumerConfig(
            durable_name=worker_consumer(p),
            filter_subject=partition_filter(p),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_deliver=MAX_DELIVER,
            max_ack_pending=1000,
        )
        for p in range(partitions)
    ]
    configs.append(
        ConsumerConfig(
            durable_name=REPLIES_CONSUMER,
            filter_subject="sessions.*.*.out",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_deliver=-1,  # a reply must never be dropped; the Gateway retries until stored
        )
    )
    for config in configs:
        try:
            await js.add_consumer(STREAM, config)
        except BadRequestError:
            pass  # exists with another config (e.g. created by an older release); keep it
