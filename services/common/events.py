"""NATS JetStream: one connection per process, streams declared idempotently.

Publishing uses `Nats-Msg-Id` so that a retried publish is stored once (JetStream
deduplicates within the stream's duplicate window); consumers must still be idempotent,
because JetStream redelivers unacknowledged messages after a crash.

`Bus.publish` goes through the NATS circuit breaker and waits for the ack at most the call's
budget (services.common.dependency): with NATS down or hung it raises UNAVAILABLE naming NATS,
at once while the breaker is open. (The audit recorder has its own bounded path and gate.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common import metrics, tracing
from services.common.breaker import nats_failure
from services.common.config import NatsConfig
from services.common.dependency import Dependency

log = logging.getLogger(__name__)

NATS = Dependency("nats", "NATS", nats_failure)


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    closing: bool = False

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        stream: str,
        msg_id: str,
        ack_timeout: float | None = None,  # None: NATS.timeout (SOMA_DEPENDENCY_TIMEOUT_MS)
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """A JetStream publish deduplicated by `msg_id`, in a producer span whose W3C
        `traceparent` travels in the headers, so the consumer continues the trace."""
        sent = {**(headers or {}), "Nats-Msg-Id": msg_id}
        with tracing.publish_span(subject, stream, sent):
            try:
                async with NATS.guard(f"publish to {stream}", ack_timeout) as budget:
                    ack = await self.js.publish(
                        subject, payload, timeout=budget.seconds, stream=stream, headers=sent
                    )
            except Exception:
                metrics.publish_failed(stream)
                raise
        metrics.published(stream)
        return ack

    async def close(self) -> None:
        # close(), not drain(): drain waits for pull subscriptions' internal queues, which a
        # cancelled fetch never empties (it hung shutdown for 30 s). Every consumer here acks
        # explicitly, so anything not acked is simply redelivered.
        self.closing = True
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.flush(), 2.0)
            await self.nc.close()


async def connect(config: NatsConfig, name: str) -> Bus:
    bus: Bus | None = None

    async def on_disconnect() -> None:
        if bus is None or not bus.closing:
            log.warning("NATS disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS reconnected")

    async def on_error(error: Exception) -> None:
        log.warning("NATS error: %s", error)

    nc = await nats.connect(
        servers=list(config.servers),
        name=name,
        max_reconnect_attempts=-1,  # a restarted NATS must not leave a replica deaf forever
        reconnect_time_wait=0.5,
        connect_timeout=5,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )
    bus = Bus(nc, nc.jetstream(timeout=5))
    return bus


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Creates the stream, or updates it to `config` when it exists (e.g. new subjects)."""
    try:
        await js.stream_info(config.name or "")
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
            return
        except BadRequestError:
            pass  # another replica created it first
    await js.update_stream(config)
