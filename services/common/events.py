"""NATS JetStream: one connection per process, streams declared idempotently.

Publishing uses `Nats-Msg-Id` so that a retried publish is stored once (JetStream
deduplicates within the stream's duplicate window); consumers must still be idempotent,
because JetStream redelivers unacknowledged messages after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common.config import NatsConfig

log = logging.getLogger(__name__)


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    closing: bool = False

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
