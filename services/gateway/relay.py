"""Moving messages between PostgreSQL and JetStream, without losing any.

* `Publisher` publishes a stored user message with `Nats-Msg-Id` = message id and marks it
  published; messages whose publish failed (NATS down) stay in the outbox and are retried by
  `run_outbox` until JetStream acknowledges them. Deduplication makes the retries safe.
* `run_reply_ingester` pulls worker replies from the shared durable consumer, stores each one
  (idempotently) and only then acknowledges it.
* After any new session event, a core-NATS nudge on `gateway.events.<session id>` wakes the
  streams of every Gateway replica; streams also poll, so a lost nudge only delays.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import FetchTimeoutError

from services.common import metrics, tracing
from services.common.errors import Unavailable
from services.common.events import Bus
from services.gateway import queue
from services.gateway.store import SessionStore

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 2.0  # seconds; past it the message waits in the outbox


class Publisher:
    def __init__(self, bus: Bus, store: SessionStore) -> None:
        self.bus = bus
        self.store = store

    async def publish(self, job: queue.Job) -> bool:
        """True when JetStream acknowledged the job (now or in an earlier attempt)."""
        try:
            await self.bus.publish(
                queue.inbound_subject(job.partition, job.session_id),
                job.encode(),
                ack_timeout=PUBLISH_TIMEOUT,
                stream=queue.STREAM,
                msg_id=job.message_id,
            )
        except (nats.errors.Error, TimeoutError, OSError, Unavailable) as error:
            # Unavailable: NATS's breaker is open or the ack did not come within the budget.
            log.warning("message %s left in the outbox: %s", job.message_id, error or type(error))
            return False
        await self.store.mark_published([job.message_id])
        return True

    async def nudge(self, session_id: str) -> None:
        try:
            await self.bus.nc.publish(queue.events_subject(session_id), b"")
        except (nats.errors.Error, OSError) as error:
            log.debug("event nudge for %s not sent: %s", session_id, error)

    async def run_outbox(self, interval: float = 1.0) -> None:
        """Republishes messages that were stored but not acknowledged by JetStream."""
        while True:
            await asyncio.sleep(interval)
            try:
                rows = await self.store.unpublished(older_than_seconds=PUBLISH_TIMEOUT, limit=200)
                for row in rows:
                    job = queue.Job(
                        message_id=str(row["id"]),
                        session_id=str(row["session_id"]),
                        tenant=row["tenant"],
                        partition=row["partition"],
                        tool=row["tool"],
                        content=row["content"],
                    )
                    if not await self.publish(job):
                        break  # NATS still down; try again next round
                    log.info("outbox: published message %s", job.message_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox round failed; retrying")


async def _ingest_reply(msg: Msg, store: SessionStore, publisher: Publisher) -> None:
    metrics.received(queue.REPLIES_CONSUMER, msg.reply)
    try:
        reply = queue.Reply.decode(msg.data)
    except (ValueError, TypeError) as error:
        log.error("dropping malformed reply on %s: %s", msg.subject, error)
        await msg.term()
        return
    seq = await store.record_reply(
        tenant=reply.tenant,
        session_id=reply.session_id,
        message_id=reply.message_id,
        content=reply.content,
        tool=reply.tool,
        cache_hit=reply.cache_hit,
        error=reply.error,
    )
    await msg.ack()
    metrics.acked(queue.REPLIES_CONSUMER)
    if seq:
        await publisher.nudge(reply.session_id)


async def run_reply_ingester(bus: Bus, store: SessionStore, publisher: Publisher) -> None:
    subscription = None
    while True:
        try:
            if subscription is None:
                subscription = await bus.js.pull_subscribe_bind(
                    durable=queue.REPLIES_CONSUMER, stream=queue.STREAM
                )
            try:
                messages = await subscription.fetch(batch=100, timeout=1.0)
            except (FetchTimeoutError, TimeoutError):
                continue
            for msg in messages:
                # The worker's traceparent: storing the reply ends the request's trace.
                with tracing.consume_span(queue.REPLIES_CONSUMER, msg.subject, msg.headers):
                    await _ingest_reply(msg, store, publisher)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("reply ingester: %s; retrying in 1s", error)
            subscription = None
            await asyncio.sleep(1.0)
