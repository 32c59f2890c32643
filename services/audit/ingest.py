"""The audit writer: JetStream `AUDIT` -> PostgreSQL, chained, exactly once.

A durable pull consumer (`audit-writer`, shared by every Audit replica) feeds the writer
(feed.py): messages are decoded and canonicalized as they arrive, while the previous batch is in
PostgreSQL, and the writer takes whatever has arrived (up to a batch) once it is free. A batch
is acked only after its transaction commits, so a crash (even kill -9) loses nothing: unacked
messages are redelivered, and the store skips events already chained (dedupe by event id under
the chain-head locks), so nothing is stored twice either. After a commit, a core-NATS nudge on
`audit-stored.<tenant>` wakes live tails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from services.audit.feed import PullFeed
from services.audit.rows import Prepared, prepare
from services.audit.store import AuditStore
from services.common import metrics, tracing
from services.common.audit.event import STREAM, SUBJECTS
from services.common.audit.recorder import STREAM_CONFIG
from services.common.events import Bus, ensure_stream

log = logging.getLogger(__name__)

CONSUMER = "audit-writer"
NUDGE_PREFIX = "audit-stored"  # not under `audit.`: the AUDIT stream would capture it
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def nudge_subject(tenant: str) -> str:
    return f"{NUDGE_PREFIX}.{_TOKEN.sub('_', tenant) or '_'}"


async def ensure_audit_stream(bus: Bus) -> None:
    """The AUDIT stream and the writer's consumer, idempotently (emitters declare the stream
    too; whoever starts first creates it)."""
    await ensure_stream(bus.js, STREAM_CONFIG)
    with contextlib.suppress(BadRequestError):  # exists (maybe with an older config): keep it
        await bus.js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=CONSUMER,
                filter_subject=SUBJECTS[0],
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=60,
                max_deliver=-1,  # an audit event is never given up on
                max_ack_pending=50_000,
            ),
        )


@dataclass(frozen=True)
class WriterSettings:
    batch: int = 1000  # at most this many events per transaction
    window: int = 10_000  # events requested from JetStream but not yet acked


@dataclass
class WriterStats:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0


class Writer:
    def __init__(self, bus: Bus, store: AuditStore, settings: WriterSettings | None = None) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings or WriterSettings()
        self.stats = WriterStats()

    async def run(self) -> None:
        feed: PullFeed[Prepared] = PullFeed(
            self.bus.nc,
            STREAM,
            CONSUMER,
            self._decode,
            window=max(self.settings.window, 2 * self.settings.batch),
        )
        await feed.start()
        try:
            while True:
                taken = await feed.take(self.settings.batch)
                try:
                    await self._write([item for item, _ in taken], [msg for _, msg in taken])
                finally:
                    await feed.release(len(taken))
        finally:
            await feed.stop()

    async def _decode(self, msg: Msg) -> Prepared | None:
        metrics.received(CONSUMER, msg.reply)
        headers = msg.headers or {}
        try:
            # Continues the audited call's trace: it shows when Audit took the event in (the
            # batch's database write serves many traces, so it is not part of any).
            with tracing.consume_span(CONSUMER, msg.subject, headers):
                return prepare(msg.data, headers.get("Nats-Msg-Id", ""), datetime.now(UTC))
        except ValueError as error:
            self.stats.rejected += 1
            log.error("dropping malformed audit message on %s: %s", msg.subject, error)
            with contextlib.suppress(Exception):
                await msg.term()
            return None

    async def _write(self, items: list[Prepared], messages: list[Msg]) -> None:
        appended = None
        delay = 0.1
        while appended is None:
            try:
                appended = await self.store.append(items)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # PostgreSQL down: keep the batch, retry
                log.warning("audit batch of %d not stored (%s); retrying", len(items), error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.stats.stored += appended.stored
        self.stats.duplicates += appended.duplicates
        acked = 0
        for msg in messages:  # committed: now JetStream may forget them
            with contextlib.suppress(Exception):
                await msg.ack()
                acked += 1
        metrics.acked(CONSUMER, acked)
        for tenant, sequence in appended.heads.items():
            with contextlib.suppress(Exception):
                await self.bus.nc.publish(nudge_subject(tenant), str(sequence).encode())
