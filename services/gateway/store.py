"""Sessions, messages and session events in PostgreSQL.

Every query is scoped by tenant. Each change to a session and the event describing it are
written in one transaction, with the session's `last_seq` as the event counter, so event
sequence numbers have no gaps and never go backwards.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import FailedPrecondition, NotFound, PermissionDenied
from soma.gateway.v1 import resources_pb2 as pb

MIGRATIONS = Path(__file__).parent / "migrations"

ACTIVE = pb.SESSION_STATE_ACTIVE
CLOSED = pb.SESSION_STATE_CLOSED


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def session_from_row(row: Mapping[str, Any]) -> pb.Session:
    return pb.Session(
        name=f"sessions/{row['id']}",
        tenant=row["tenant"],
        display_name=row["display_name"],
        agent=row["agent"],
        labels=json.loads(row["labels"]) if isinstance(row["labels"], str) else row["labels"],
        state=row["state"],
        partition=row["partition"],
        message_count=row["message_count"],
        last_event_sequence=row["last_seq"],
        create_time=_ts(row["create_time"]),
        update_time=_ts(row["update_time"]),
        close_time=_ts(row["close_time"]),
    )


def message_from_row(row: Mapping[str, Any]) -> pb.Message:
    return pb.Message(
        name=f"sessions/{row['session_id']}/messages/{row['id']}",
        role=row["role"],
        content=row["content"],
        tool=row["tool"],
        state=row["state"],
        reply=f"sessions/{row['session_id']}/messages/{row['reply']}" if row["reply"] else "",
        cache_hit=row["cache_hit"],
        error=row["error"],
        create_time=_ts(row["create_time"]),
    )


@dataclass(frozen=True)
class SentMessage:
    message: pb.Message
    partition: int
    tenant: str
    created: bool  # False when a repeated request_id returned the first message
    published: bool


class SessionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- sessions ---------------------------------------------------------------------------

    async def create_session(
        self,
        *,
        tenant: str,
        display_name: str,
        agent: str,
        labels: Mapping[str, str],
        partition_for: Any,
        request_id: str,
    ) -> tuple[pb.Session, int]:
        """Returns the session and the sequence of its creation event (0 on an idempotent
        repeat)."""
        session_id = str(uuid.uuid4())
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO gateway_sessions
                       (id, tenant, display_name, agent, labels, state, partition, request_id,
                        last_seq)
                   VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, NULLIF($8, ''), 1)
                   ON CONFLICT (tenant, request_id) DO NOTHING
                   RETURNING *""",
                session_id,
                tenant,
                display_name,
                agent,
                json.dumps(dict(labels)),
                ACTIVE,
                partition_for(session_id),
                request_id,
            )
            if row is None:  # the same request_id was used before: return the first result
                row = await conn.fetchrow(
                    "SELECT * FROM gateway_sessions WHERE tenant = $1 AND request_id = $2",
                    tenant,
                    request_id,
                )
                return session_from_row(row), 0
            session = session_from_row(row)
            event = pb.SessionEvent(
                session=session.name,
                sequence=1,
                create_time=session.create_time,
                status_change=pb.SessionStatusChange(state=ACTIVE),
            )
            await self._insert_event(conn, session_id, event)
            return session, 1

    async def get_session(self, tenant: str, session_id: str) -> pb.Session:
        row = await self.pool.fetchrow(
            "SELECT * FROM gateway_sessions WHERE id = $1 AND tenant = $2", session_id, tenant
        )
        if row is None:
            raise NotFound(f"session sessions/{session_id} does not exist")
        return session_from_row(row)

    async def list_sessions(
        self, tenant: str, state: int, after_pos: int | None, limit: int
    ) -> tuple[list[pb.Session], int | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM gateway_sessions
               WHERE tenant = $1 AND ($2 = 0 OR state = $2) AND ($3::bigint IS NULL OR pos < $3)
               ORDER BY pos DESC LIMIT $4""",
            tenant,
            state,
            after_pos,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return [session_from_row(r) for r in rows], (rows[-1]["pos"] if more else None)

    async def close_session(self, tenant: str, session_id: str) -> tuple[pb.Session, int]:
        """Closes the session; returns it and the status event's sequence (0 if it was
        already closed)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock_for_write(conn, tenant, session_id)
            row = await conn.fetchrow(
                """UPDATE gateway_sessions
                   SET state = $3, close_time = now(), update_time = now(), last_seq = last_seq + 1
                   WHERE id = $1 AND tenant = $2 AND state = $4
                   RETURNING *""",
                session_id,
                tenant,
                CLOSED,
                ACTIVE,
            )
            if row is None:
                return await self.get_session(tenant, session_id), 0
            session = session_from_row(row)
            event = pb.SessionEvent(
                session=session.name,
                sequence=row["last_seq"],
                create_time=session.update_time,
                status_change=pb.SessionStatusChange(previous_state=ACTIVE, state=CLOSED),
            )
            await self._insert_event(conn, session_id, event)
            return session, row["last_seq"]

    @staticmethod
    async def _lock_for_write(
        conn: asyncpg.Connection, tenant: str, session_id: str
    ) -> asyncpg.Record:
        """Locks the session for a change. Permission before existence (AIP-193): a session of
        another tenant is PERMISSION_DENIED for writes (reads of it answer NOT_FOUND)."""
        row = await conn.fetchrow(
            "SELECT tenant, state FROM gateway_sessions WHERE id = $1 FOR UPDATE", session_id
        )
        if row is None:
            raise NotFound(f"session sessions/{session_id} does not exist")
        if row["tenant"] != tenant:
            raise PermissionDenied(
                f"you may not change session sessions/{session_id}: it is not in your tenant",
                reason="CROSS_TENANT",
            )
        return row

    # -- messages ---------------------------------------------------------------------------

    async def add_user_message(
        self, *, tenant: str, session_id: str, content: str, tool: str, request_id: str
    ) -> SentMessage:
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock the session row first: sends to one session are serialized, so a repeated
            # request_id is always seen by the second caller.
            locked = await self._lock_for_write(conn, tenant, session_id)
            if request_id:
                existing = await conn.fetchrow(
                    "SELECT * FROM gateway_messages WHERE session_id = $1 AND request_id = $2",
                    session_id,
                    request_id,
                )
                if existing is not None:
                    return SentMessage(
                        message_from_row(existing),
                        existing["partition"],
                        tenant,
                        created=False,
                        published=existing["published_at"] is not None,
                    )
            if locked["state"] != ACTIVE:
                raise FailedPrecondition(
                    f"session sessions/{session_id} is closed; create a new session to send "
                    "more messages",
                    reason="SESSION_CLOSED",
                )
            session = await conn.fetchrow(
                """UPDATE gateway_sessions
                   SET last_seq = last_seq + 1, message_count = message_count + 1,
                       update_time = now()
                   WHERE id = $1 RETURNING partition, last_seq""",
                session_id,
            )
            row = await conn.fetchrow(
                """INSERT INTO gateway_messages
                       (id, session_id, tenant, partition, role, content, tool, state, request_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF($9, ''))
                   RETURNING *""",
                str(uuid.uuid4()),
                session_id,
                tenant,
                session["partition"],
                pb.MESSAGE_ROLE_USER,
                content,
                tool,
                pb.MESSAGE_STATE_QUEUED,
                request_id,
            )
            message = message_from_row(row)
            event = pb.SessionEvent(
                session=f"sessions/{session_id}",
                sequence=session["last_seq"],
                create_time=message.create_time,
                message_queued=message,
            )
            await self._insert_event(conn, session_id, event)
            return SentMessage(message, session["partition"], tenant, True, False)

    async def mark_published(self, message_ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE gateway_messages SET published_at = now() "
            "WHERE id = ANY($1::uuid[]) AND published_at IS NULL",
            list(message_ids),
        )

    async def unpublished(self, older_than_seconds: float, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT id, session_id, tenant, partition, tool, content FROM gateway_messages
               WHERE published_at IS NULL AND role = $1
                 AND create_time < now() - make_interval(secs => $2)
               ORDER BY pos LIMIT $3""",
            pb.MESSAGE_ROLE_USER,
            older_than_seconds,
            limit,
        )

    async def outbox_depth(self) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM gateway_messages WHERE published_at IS NULL AND role = $1",
            pb.MESSAGE_ROLE_USER,
        )

    async def list_messages(
        self, tenant: str, session_id: str, after_pos: int | None, limit: int
    ) -> tuple[list[pb.Message], int | None]:
        await self.get_session(tenant, session_id)
        rows = await self.pool.fetch(
            """SELECT * FROM gateway_messages
               WHERE session_id = $1 AND tenant = $2 AND ($3::bigint IS NULL OR pos > $3)
               ORDER BY pos LIMIT $4""",
            session_id,
            tenant,
            after_pos,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return [message_from_row(r) for r in rows], (rows[-1]["pos"] if more else None)

    async def record_reply(
        self,
        *,
        tenant: str,
        session_id: str,
        message_id: str,
        content: str,
        tool: str,
        cache_hit: bool,
        error: str,
    ) -> int:
        """Stores a worker's reply once (a redelivered reply is a no-op); returns the event
        sequence, or 0 when nothing new was stored."""
        reply_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"soma-reply:{message_id}"))
        async with self.pool.acquire() as conn, conn.transaction():
            user = await conn.fetchrow(
                "SELECT * FROM gateway_messages WHERE id = $1 AND session_id = $2 AND tenant = $3 "
                "FOR UPDATE",
                message_id,
                session_id,
                tenant,
            )
            if (
                user is None
                or user["reply"] is not None
                or user["state"] != pb.MESSAGE_STATE_QUEUED
            ):
                return 0
            session = await conn.fetchrow(
                """UPDATE gateway_sessions
                   SET last_seq = last_seq + 1, update_time = now(),
                       message_count = message_count + CASE WHEN $2 = '' THEN 1 ELSE 0 END
                   WHERE id = $1 RETURNING last_seq, partition""",
                session_id,
                error,
            )
            if error:
                row = await conn.fetchrow(
                    "UPDATE gateway_messages SET state = $2, error = $3 WHERE id = $1 RETURNING *",
                    message_id,
                    pb.MESSAGE_STATE_FAILED,
                    error,
                )
                failed = message_from_row(row)
                event = pb.SessionEvent(
                    session=f"sessions/{session_id}",
                    sequence=session["last_seq"],
                    create_time=_ts(datetime.now().astimezone()),
                    message_failed=failed,
                )
            else:
                reply_row = await conn.fetchrow(
                    """INSERT INTO gateway_messages
                           (id, session_id, tenant, partition, role, content, tool, state, reply,
                            cache_hit, published_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
                       RETURNING *""",
                    reply_id,
                    session_id,
                    tenant,
                    session["partition"],
                    pb.MESSAGE_ROLE_AGENT,
                    content,
                    tool,
                    pb.MESSAGE_STATE_COMPLETE,
                    message_id,
                    cache_hit,
                )
                await conn.execute(
                    "UPDATE gateway_messages SET state = $2, reply = $3 WHERE id = $1",
                    message_id,
                    pb.MESSAGE_STATE_ANSWERED,
                    reply_id,
                )
                reply = message_from_row(reply_row)
                event = pb.SessionEvent(
                    session=f"sessions/{session_id}",
                    sequence=session["last_seq"],
                    create_time=reply.create_time,
                    agent_reply=reply,
                )
            await self._insert_event(conn, session_id, event)
            return session["last_seq"]

    async def tool_cache_counts(self) -> dict[int, tuple[int, int]]:
        """Per partition: (agent replies served from the cache, replies that ran the tool)."""
        rows = await self.pool.fetch(
            """SELECT partition, count(*) FILTER (WHERE cache_hit) AS hits,
                      count(*) FILTER (WHERE NOT cache_hit) AS misses
               FROM gateway_messages WHERE role = $1 GROUP BY partition""",
            pb.MESSAGE_ROLE_AGENT,
        )
        return {r["partition"]: (r["hits"], r["misses"]) for r in rows}

    # -- events -----------------------------------------------------------------------------

    @staticmethod
    async def _insert_event(
        conn: asyncpg.Connection, session_id: str, event: pb.SessionEvent
    ) -> None:
        await conn.execute(
            "INSERT INTO gateway_session_events (session_id, seq, payload) VALUES ($1, $2, $3)",
            session_id,
            event.sequence,
            event.SerializeToString(),
        )

    async def events_after(
        self, session_id: str, after_seq: int, limit: int = 100
    ) -> list[pb.SessionEvent]:
        rows = await self.pool.fetch(
            """SELECT payload FROM gateway_session_events
               WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
            session_id,
            after_seq,
            limit,
        )
        return [pb.SessionEvent.FromString(r["payload"]) for r in rows]

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")
