"""Per-key usage budget and rate limit (only for keys that have them), and last-used batching.

Both limits are enforced in Postgres so they hold across every replica: the budget with one
atomic `UPDATE ... WHERE remaining_calls > 0`, the rate limit with one upserted row per key and
minute (a fixed window: simple and exact enough for a per-minute quota).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg

from services.common.auth.keycache import KeyRecord
from services.common.errors import ResourceExhausted

log = logging.getLogger(__name__)

_BUDGET_SQL = (
    "UPDATE auth_api_keys SET remaining_calls = remaining_calls - 1 "
    "WHERE id = $1 AND remaining_calls > 0 RETURNING remaining_calls"
)
_RATE_SQL = """
INSERT INTO auth_rate_windows AS w (key_id, window_start, calls)
VALUES ($1, date_trunc('minute', now()), 1)
ON CONFLICT (key_id, window_start) DO UPDATE SET calls = w.calls + 1
RETURNING w.calls,
          extract(epoch FROM (w.window_start + interval '1 minute' - now()))::float8 AS retry_after
"""
_LAST_USED_SQL = """
UPDATE auth_api_keys AS k
SET last_used_time = GREATEST(COALESCE(k.last_used_time, u.t), u.t)
FROM unnest($1::text[], $2::timestamptz[]) AS u(id, t)
WHERE k.id = u.id
"""
_PRUNE_SQL = "DELETE FROM auth_rate_windows WHERE window_start < now() - interval '2 minutes'"


class UsageLimiter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def charge(self, record: KeyRecord) -> None:
        """Counts one call against `record`'s limits; raises ResourceExhausted when over."""
        if record.rate_limit > 0:
            row = await self._pool.fetchrow(_RATE_SQL, record.key_id)
            if row is not None and row["calls"] > record.rate_limit:
                retry = max(float(row["retry_after"]), 0.0)
                raise ResourceExhausted(
                    f"API key {record.key_id} is over its rate limit of "
                    f"{record.rate_limit} calls per minute; retry in {retry:.0f} s",
                    retry_after_seconds=round(retry, 3),
                    reason="RATE_LIMITED",
                )
        if record.has_budget:
            left = await self._pool.fetchval(_BUDGET_SQL, record.key_id)
            if left is None:
                raise ResourceExhausted(
                    f"API key {record.key_id} has used its whole usage budget of "
                    f"{record.usage_budget} calls",
                    reason="USAGE_BUDGET_EXHAUSTED",
                )


class LastUsedRecorder:
    """Remembers when each key was last used and writes it every `interval` seconds in one
    statement, instead of one UPDATE per call."""

    def __init__(self, pool: asyncpg.Pool, interval: float = 5.0) -> None:
        self._pool = pool
        self._interval = interval
        self._pending: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0

    def note(self, key_id: str) -> None:
        self._pending[key_id] = datetime.now(UTC)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="auth-last-used")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception as error:  # keep the loop alive through a database restart
                log.warning("could not record API key last use: %s", error)

    async def flush(self) -> int:
        batch, self._pending = self._pending, {}
        if batch:
            try:
                await self._pool.execute(_LAST_USED_SQL, list(batch), list(batch.values()))
            except BaseException:
                for key_id, when in batch.items():  # retry next time, keep the newest
                    self._pending.setdefault(key_id, when)
                raise
        if time.monotonic() - self._last_prune > 60:
            self._last_prune = time.monotonic()
            await self._pool.execute(_PRUNE_SQL)
        return len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()
