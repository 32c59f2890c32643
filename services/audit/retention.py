"""Retention: per-tenant policies and the purge that applies them.

A purge drops events from the start of a chain only: everything before the oldest event that
is still within the retention period. In the same transaction (holding the chain head lock,
so the writer waits) it moves the tenant's checkpoint to the last dropped event, so that the
first retained event's `previous_hash` still has something to be checked against.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.audit import rows
from services.common.audit import chain
from soma.audit.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

POLICY_NAME = "retentionPolicy"
MIN_RETENTION = timedelta(days=1)
PURGE_TIMEOUT = 300.0  # seconds one tenant's purge may take (a background task, no caller)


@dataclass(frozen=True)
class PurgeResult:
    dropped: int
    checkpoint_sequence: int


def checkpoint_proto(tenant: str, row: rows.Row | None) -> pb.AuditChainCheckpoint:
    """The tenant's checkpoint; the start of the chain when retention never dropped anything."""
    if row is None:
        return pb.AuditChainCheckpoint(tenant=tenant, sequence=0, hash=chain.GENESIS)
    return pb.AuditChainCheckpoint(
        tenant=tenant,
        sequence=row["sequence"],
        hash=row["hash"],
        event_time=rows.timestamp(row["event_time"]),
        events_dropped=row["events_dropped"],
        create_time=rows.timestamp(row["create_time"]),
    )


class Retention:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def policy(self, tenant: str) -> pb.RetentionPolicy:
        row = await self.pool.fetchrow("SELECT * FROM audit_retention WHERE tenant = $1", tenant)
        checkpoint = await self.pool.fetchrow(
            "SELECT * FROM audit_checkpoints WHERE tenant = $1", tenant
        )
        policy = pb.RetentionPolicy(
            name=POLICY_NAME, tenant=tenant, checkpoint=checkpoint_proto(tenant, checkpoint)
        )
        if row is not None:
            if row["retention_seconds"]:
                policy.retention.FromSeconds(row["retention_seconds"])
            if row["last_purge_time"] is not None:
                policy.last_purge_time.FromDatetime(row["last_purge_time"])
            policy.update_time.FromDatetime(row["update_time"])
        return policy

    async def set_retention(self, tenant: str, seconds: int) -> None:
        await self.pool.execute(
            """INSERT INTO audit_retention (tenant, retention_seconds) VALUES ($1, $2)
               ON CONFLICT (tenant) DO UPDATE
               SET retention_seconds = EXCLUDED.retention_seconds, update_time = now()""",
            tenant,
            seconds,
        )

    async def purge(self, tenant: str, now: datetime | None = None) -> PurgeResult:
        """Applies the tenant's policy once."""
        # A purge may delete millions of rows in one transaction: it gets its own bound, not
        # the 3 s every call's unit of work gets (services.common.db.GuardedPool).
        async with self.pool.acquire(timeout=PURGE_TIMEOUT) as conn, conn.transaction():
            seconds = await conn.fetchval(
                "SELECT retention_seconds FROM audit_retention WHERE tenant = $1", tenant
            )
            head = await conn.fetchrow(
                "SELECT sequence FROM audit_chain_heads WHERE tenant = $1 FOR UPDATE", tenant
            )
            previous = await conn.fetchrow(
                "SELECT sequence, events_dropped FROM audit_checkpoints WHERE tenant = $1", tenant
            )
            done = previous["sequence"] if previous else 0
            if not seconds or head is None:
                return PurgeResult(0, done)
            cutoff = (now or await conn.fetchval("SELECT now()")) - timedelta(seconds=seconds)
            keep_from = await conn.fetchval(
                "SELECT min(sequence) FROM audit_events WHERE tenant = $1 AND event_time >= $2",
                tenant,
                cutoff,
            )
            last_dropped = (keep_from if keep_from is not None else head["sequence"] + 1) - 1
            if last_dropped <= done:
                return PurgeResult(0, done)
            last = await conn.fetchrow(
                "SELECT hash, event_time FROM audit_events WHERE tenant = $1 AND sequence = $2",
                tenant,
                last_dropped,
            )
            if last is None:  # the chain is already broken there; keep it for verification
                log.warning("not purging tenant %s: event %d is missing", tenant, last_dropped)
                return PurgeResult(0, done)
            status = await conn.execute(
                "DELETE FROM audit_events WHERE tenant = $1 AND sequence <= $2",
                tenant,
                last_dropped,
            )
            dropped = int(status.split()[-1])
            await conn.execute(
                """INSERT INTO audit_checkpoints
                       (tenant, sequence, hash, event_time, events_dropped, create_time)
                   VALUES ($1, $2, $3, $4, $5, now())
                   ON CONFLICT (tenant) DO UPDATE SET sequence = EXCLUDED.sequence,
                       hash = EXCLUDED.hash, event_time = EXCLUDED.event_time,
                       events_dropped = audit_checkpoints.events_dropped
                                        + EXCLUDED.events_dropped,
                       create_time = now()""",
                tenant,
                last_dropped,
                last["hash"],
                last["event_time"],
                dropped,
            )
            await conn.execute(
                "UPDATE audit_retention SET last_purge_time = now() WHERE tenant = $1", tenant
            )
        log.info(
            "retention dropped %d events of tenant %s (through %d)", dropped, tenant, last_dropped
        )
        return PurgeResult(dropped, last_dropped)

    async def purge_all(self) -> None:
        tenants = await self.pool.fetch(
            "SELECT tenant FROM audit_retention WHERE retention_seconds > 0"
        )
        for row in tenants:
            try:
                await self.purge(row["tenant"])
            except Exception:
                log.exception("retention purge of tenant %s failed", row["tenant"])

    async def run(self, interval: float) -> None:
        """Purges every tenant with a policy every `interval` seconds."""
        while True:
            await self.purge_all()
            await asyncio.sleep(interval)
