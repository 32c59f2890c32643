"""API keys in PostgreSQL (auth_api_keys) and AIP-155 request ids (keys_requests).

Every read is scoped by tenant. Writes lock the key row (`FOR UPDATE`) and hand it to the
caller's `check` before changing anything, so the permission check sees the row it changes.
Only HMAC hashes of secrets are stored; secrets never reach this module's queries as text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from services.common import db, paging
from services.common.errors import FailedPrecondition
from services.common.timestamps import to_timestamp
from soma.keys.v1 import resources_pb2 as pb

MIGRATIONS = Path(__file__).parent / "migrations"

ACTIVE = pb.API_KEY_STATE_ACTIVE
REVOKED = pb.API_KEY_STATE_REVOKED
EXPIRED = pb.API_KEY_STATE_EXPIRED

# The state a reader sees: an active key past its expire_time is EXPIRED.
_STATE_SQL = (
    "CASE WHEN state = 1 AND expire_time IS NOT NULL AND expire_time <= now() THEN 3 ELSE state END"
)
_SELECT = f"SELECT *, ({_STATE_SQL}) AS effective_state, now() AS db_now FROM auth_api_keys"

Row = Mapping[str, Any]
Check = Callable[[Row | None], None]


def key_from_row(row: Row, env: str) -> pb.ApiKey:
    grace_end = row["previous_secret_expire_time"]
    grace_valid = (
        row["previous_secret_hash"] is not None
        and grace_end is not None
        and grace_end > row["db_now"]
    )
    return pb.ApiKey(
        name=f"keys/{row['id']}",
        tenant=row["tenant"],
        display_name=row["display_name"],
        key_id=row["id"],
        prefix=f"soma_{env}_{row['id']}_",
        scopes=list(row["scopes"]),
        roles=list(row["roles"]),
        expire_time=to_timestamp(row["expire_time"]),
        usage_budget=row["usage_budget"] or 0,
        remaining_calls=max(row["remaining_calls"] or 0, 0) if row["usage_budget"] else 0,
        rate_limit_per_minute=row["rate_limit_per_minute"] or 0,
        state=row["effective_state"],
        owner=row["owner"],
        last_used_time=to_timestamp(row["last_used_time"]),
        create_time=to_timestamp(row["create_time"]),
        update_time=to_timestamp(row["update_time"]),
        revoke_time=to_timestamp(row["revoke_time"]),
        rotate_time=to_timestamp(row["rotate_time"]),
        previous_secret_expire_time=to_timestamp(grace_end) if grace_valid else None,
    )


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant: str
    owner: str
    display_name: str
    scopes: list[str]
    roles: list[str]
    secret_hash: bytes
    expire_time: datetime | None
    usage_budget: int
    rate_limit_per_minute: int
    request_id: str


async def claim_request(
    conn: asyncpg.Connection, tenant: str, request_id: str, method: str, resource: str
) -> bool:
    """Records an AIP-155 request id of a Keys method (see services.common.db.claim_request)."""
    return await db.claim_request(conn, "keys_requests", tenant, request_id, method, resource)


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def prune_requests(self, older_than: timedelta = timedelta(days=7)) -> None:
        await self.pool.execute(
            "DELETE FROM keys_requests WHERE create_time < now() - $1::interval", older_than
        )

    async def create(self, key: NewKey) -> tuple[Row, bool]:
        """Returns the row and True, or the first key of a repeated request_id and False."""
        row = await self.pool.fetchrow(
            f"""WITH ins AS (
                   INSERT INTO auth_api_keys
                       (id, tenant, owner, display_name, scopes, roles, secret_hash, state,
                        expire_time, usage_budget, remaining_calls, rate_limit_per_minute,
                        request_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, {ACTIVE}, $8, NULLIF($9, 0),
                           NULLIF($9, 0), NULLIF($10, 0), NULLIF($11, ''))
                   ON CONFLICT (tenant, request_id) DO NOTHING RETURNING *)
               SELECT *, ({_STATE_SQL}) AS effective_state, now() AS db_now FROM ins""",
            key.key_id,
            key.tenant,
            key.owner,
            key.display_name,
            key.scopes,
            key.roles,
            key.secret_hash,
            key.expire_time,
            key.usage_budget,
            key.rate_limit_per_minute,
            key.request_id,
        )
        if row is not None:
            return row, True
        first = await self.pool.fetchrow(
            f"{_SELECT} WHERE tenant = $1 AND request_id = $2", key.tenant, key.request_id
        )
        assert first is not None  # the conflicting row exists (rows are never deleted)
        return first, False

    async def get(self, tenant: str, key_id: str) -> Row | None:
        return await self.pool.fetchrow(f"{_SELECT} WHERE id = $1 AND tenant = $2", key_id, tenant)

    async def list(
        self,
        tenant: str,
        *,
        state: int,
        owner: str,
        only_owner: str | None,
        also_key: str | None,
        before_pos: int | None,
        limit: int,
    ) -> tuple[list[Row], int | None]:
        """Newest first. `only_owner` (members): keys of that owner, plus `also_key` (the
        caller's own key)."""
        rows = await self.pool.fetch(
            f"""SELECT * FROM ({_SELECT} WHERE tenant = $1) k
               WHERE ($2 = 0 OR effective_state = $2)
                 AND ($3 = '' OR owner = $3)
                 AND ($4::text IS NULL OR owner = $4 OR id = $5)
                 AND ($6::bigint IS NULL OR pos < $6)
               ORDER BY pos DESC LIMIT $7""",
            tenant,
            state,
            owner,
            only_owner,
            also_key or "",
            before_pos,
            limit + 1,
        )
        return paging.split_page(rows, limit, "pos")

    async def change(
        self,
        tenant: str,
        key_id: str,
        check: Check,
        method: str,
        request_id: str,
        apply: Callable[[asyncpg.Connection, Row], Any],
    ) -> tuple[Row, bool]:
        """Locks the key, checks permission on it (`check` gets None when the tenant has no
        such key), then `apply`s the change unless the request id is a repeat. Returns the
        key after the change and whether anything was applied."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"{_SELECT} WHERE id = $1 AND tenant = $2 FOR UPDATE", key_id, tenant
            )
            check(row)
            assert row is not None  # check() refuses a missing key
            if not await claim_request(conn, tenant, request_id, method, f"keys/{key_id}"):
                return row, False
            changed = await apply(conn, row)
            if changed is None:
                return row, False
            return changed, True

    @staticmethod
    async def update_fields(
        conn: asyncpg.Connection, key_id: str, values: Mapping[str, Any]
    ) -> Row:
        assignments = []
        args: list[Any] = [key_id]
        position: dict[str, int] = {}
        for column, value in values.items():
            args.append(value)
            position[column] = len(args)
            assignments.append(f"{column} = ${len(args)}")
        if "usage_budget" in position:
            # Setting a budget starts it afresh.
            assignments.append(f"remaining_calls = ${position['usage_budget']}")
        if "expire_time" in position:
            # An expired key given a later expiry (or none) works again.
            n = position["expire_time"]
            assignments.append(
                f"state = CASE WHEN state = {EXPIRED} AND (${n}::timestamptz IS NULL "
                f"OR ${n} > now()) THEN {ACTIVE} ELSE state END"
            )
        sql = (
            f"WITH upd AS (UPDATE auth_api_keys SET {', '.join(assignments)}, update_time = now() "
            f"WHERE id = $1 RETURNING *) "
            f"SELECT *, ({_STATE_SQL}) AS effective_state, now() AS db_now FROM upd"
        )
        return await conn.fetchrow(sql, *args)

    @staticmethod
    async def revoke(conn: asyncpg.Connection, row: Row, reason: str) -> Row | None:
        if row["state"] == REVOKED:
            return None  # revoking a revoked key returns it unchanged
        return await conn.fetchrow(
            f"""WITH upd AS (
                   UPDATE auth_api_keys SET state = {REVOKED}, revoke_time = now(),
                       revoke_reason = NULLIF($2, ''), previous_secret_hash = NULL,
                       previous_secret_expire_time = NULL, update_time = now()
                   WHERE id = $1 RETURNING *)
               SELECT *, ({_STATE_SQL}) AS effective_state, now() AS db_now FROM upd""",
            row["id"],
            reason,
        )

    @staticmethod
    async def rotate(conn: asyncpg.Connection, row: Row, new_hash: bytes, grace: timedelta) -> Row:
        if row["effective_state"] != ACTIVE:
            raise FailedPrecondition(
                f"key keys/{row['id']} is not active; only an active key can be rotated",
                reason="KEY_NOT_ACTIVE",
            )
        # The previous secret (if still in a grace period) is replaced: it stops at once.
        return await conn.fetchrow(
            f"""WITH upd AS (
                   UPDATE auth_api_keys SET
                       previous_secret_hash = CASE WHEN $3::interval > interval '0'
                                                   THEN secret_hash END,
                       previous_secret_expire_time = CASE WHEN $3::interval > interval '0'
                                                          THEN now() + $3::interval END,
                       secret_hash = $2, rotate_time = now(), update_time = now()
                   WHERE id = $1 RETURNING *)
               SELECT *, ({_STATE_SQL}) AS effective_state, now() AS db_now FROM upd""",
            row["id"],
            new_hash,
            grace,
        )

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")
