"""Audit events in PostgreSQL: the chained append (ingest) and the reads.

Append, in one transaction per batch: lock the batch's tenants' chain heads (`FOR UPDATE`, in
tenant order so two writers never deadlock), drop events whose id is already stored (a
redelivery after a crash between commit and ack), chain the rest after each head, COPY them in,
move the heads, commit. The caller acks the messages only after that commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.audit import rows
from services.audit.query import Where
from services.common.audit import chain

MIGRATIONS = Path(__file__).parent / "migrations"

_SELECT = "SELECT * FROM audit_events"


@dataclass(frozen=True)
class Head:
    sequence: int
    hash: str


@dataclass(frozen=True)
class Appended:
    stored: int  # events chained and inserted
    duplicates: int  # events skipped: already stored
    heads: dict[str, int]  # tenant -> head sequence after the batch, for tenants that grew


class AuditStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- ingest ---------------------------------------------------------------------------------

    async def append(self, items: Sequence[rows.Prepared]) -> Appended:
        tenants = sorted({item.event.tenant for item in items})
        ids = [item.event_id for item in items]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO audit_chain_heads (tenant) SELECT unnest($1::text[]) "
                "ON CONFLICT DO NOTHING",
                tenants,
            )
            locked = await conn.fetch(
                "SELECT tenant, sequence, hash FROM audit_chain_heads WHERE tenant = ANY($1) "
                "ORDER BY tenant FOR UPDATE",
                tenants,
            )
            heads = {r["tenant"]: Head(r["sequence"], r["hash"]) for r in locked}
            before = {t: h.sequence for t, h in heads.items()}
            # Checked under the head locks: a concurrent writer of the same event (same tenant)
            # has committed or not started.
            existing = {
                r["id"]
                for r in await conn.fetch("SELECT id FROM audit_events WHERE id = ANY($1)", ids)
            }
            ingest_time: datetime = await conn.fetchval("SELECT now()")
            records: list[tuple[Any, ...]] = []
            duplicates = 0
            for item in items:
                if item.event_id in existing:
                    duplicates += 1
                    continue
                existing.add(item.event_id)  # the same event twice in one batch
                tenant = item.event.tenant
                head = heads[tenant]
                sequence = head.sequence + 1
                hash_ = chain.link_bytes(head.hash, item.canonical)
                records.append(rows.record(item, sequence, head.hash, hash_, ingest_time))
                heads[tenant] = Head(sequence, hash_)
            if not records:
                return Appended(0, duplicates, {})
            await conn.copy_records_to_table(
                "audit_events", records=records, columns=list(rows.COLUMNS)
            )
            grown = {t: h for t, h in heads.items() if h.sequence != before[t]}
            await conn.execute(
                "UPDATE audit_chain_heads h SET sequence = v.sequence, hash = v.hash, "
                "update_time = now() FROM unnest($1::text[], $2::bigint[], $3::text[]) "
                "AS v(tenant, sequence, hash) WHERE h.tenant = v.tenant",
                list(grown),
                [h.sequence for h in grown.values()],
                [h.hash for h in grown.values()],
            )
        return Appended(len(records), duplicates, {t: h.sequence for t, h in grown.items()})

    # -- reads ----------------------------------------------------------------------------------

    async def head(self, tenant: str) -> Head:
        row = await self.pool.fetchrow(
            "SELECT sequence, hash FROM audit_chain_heads WHERE tenant = $1", tenant
        )
        return Head(row["sequence"], row["hash"]) if row else Head(0, chain.GENESIS)

    async def checkpoint(self, tenant: str) -> rows.Row | None:
        return await self.pool.fetchrow("SELECT * FROM audit_checkpoints WHERE tenant = $1", tenant)

    async def get(self, event_id: str) -> rows.Row | None:
        return await self.pool.fetchrow(f"{_SELECT} WHERE id = $1", event_id)

    async def by_sequence(self, tenant: str, sequence: int) -> rows.Row | None:
        return await self.pool.fetchrow(
            f"{_SELECT} WHERE tenant = $1 AND sequence = $2", tenant, sequence
        )

    async def page(
        self,
        where: Where,
        *,
        newest_first: bool,
        after: tuple[datetime, int] | None,
        limit: int,
    ) -> list[rows.Row]:
        """Ordered by (event_time, sequence); `after` is the last row of the previous page."""
        clauses = Where(list(where.clauses), list(where.params))
        if after is not None:
            op = "<" if newest_first else ">"
            clauses.add(f"(event_time, sequence) {op} ({{}}, {{}})", after[0], after[1])
        direction = "DESC" if newest_first else "ASC"
        clauses.params.append(limit)
        return await self.pool.fetch(
            f"{_SELECT} WHERE {clauses.sql} ORDER BY event_time {direction}, "
            f"sequence {direction} LIMIT ${len(clauses.params)}",
            *clauses.params,
        )

    async def by_sequences(
        self, where: Where, after_sequence: int, upto_sequence: int | None, limit: int
    ) -> list[rows.Row]:
        """Chain order: rows matching `where` with after_sequence < sequence <= upto."""
        clauses = Where(list(where.clauses), list(where.params))
        clauses.add("sequence > {}", after_sequence)
        if upto_sequence is not None:
            clauses.add("sequence <= {}", upto_sequence)
        clauses.params.append(limit)
        return await self.pool.fetch(
            f"{_SELECT} WHERE {clauses.sql} ORDER BY sequence LIMIT ${len(clauses.params)}",
            *clauses.params,
        )
