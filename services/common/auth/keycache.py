"""API key records: one Postgres lookup per key id, then served from memory.

Entries live `ttl` seconds at most (a backstop: NATS `keys.*` messages drop them at once, see
revocation.py). Concurrent misses for one key id share a single lookup, and a lookup that was
in flight while its key was dropped is not cached (it may have read the old row).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from services.common import metrics

STATE_ACTIVE = 1  # soma.keys.v1.ApiKeyState
STATE_REVOKED = 2
STATE_EXPIRED = 3


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    owner: str
    roles: frozenset[str]
    scopes: frozenset[str]
    secret_hash: bytes = field(repr=False)
    previous_secret_hash: bytes | None = field(repr=False)
    previous_secret_expire_time: datetime | None
    state: int
    expire_time: datetime | None
    usage_budget: int | None  # None or 0: unlimited
    rate_limit_per_minute: int | None  # None or 0: no limit

    @property
    def has_budget(self) -> bool:
        return bool(self.usage_budget and self.usage_budget > 0)

    @property
    def rate_limit(self) -> int:
        return self.rate_limit_per_minute or 0


KeyLookup = Callable[[str], Awaitable[KeyRecord | None]]

_COLUMNS = (
    "id, tenant, owner, roles, scopes, secret_hash, previous_secret_hash, "
    "previous_secret_expire_time, state, expire_time, usage_budget, rate_limit_per_minute"
)


def record_from_row(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row["id"],
        tenant=row["tenant"],
        owner=row["owner"],
        # Empty roles mean `member`, empty scopes mean "whatever the roles allow" (the contract).
        roles=frozenset(row["roles"] or ()) or frozenset({"member"}),
        scopes=frozenset(row["scopes"] or ()) or frozenset({"*"}),
        secret_hash=bytes(row["secret_hash"]),
        previous_secret_hash=bytes(row["previous_secret_hash"])
        if row["previous_secret_hash"] is not None
        else None,
        previous_secret_expire_time=row["previous_secret_expire_time"],
        state=row["state"],
        expire_time=row["expire_time"],
        usage_budget=row["usage_budget"],
        rate_limit_per_minute=row["rate_limit_per_minute"],
    )


def postgres_lookup(pool: asyncpg.Pool) -> KeyLookup:
    query = f"SELECT {_COLUMNS} FROM auth_api_keys WHERE id = $1"

    async def lookup(key_id: str) -> KeyRecord | None:
        row = await pool.fetchrow(query, key_id)
        return record_from_row(row) if row is not None else None

    return lookup


class KeyCache:
    def __init__(
        self,
        lookup: KeyLookup,
        ttl: float = 60.0,
        miss_ttl: float = 5.0,
        max_entries: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._miss_ttl = miss_ttl  # unknown ids: short, a flood of made-up ids stays cheap
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0
        self.lookups = 0  # for tests and metrics

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key_id: str, max_age: float | None = None) -> KeyRecord | None:
        """The key's record, or None if no such key. `max_age` narrows the TTL (e.g. while
        NATS is disconnected and drops may be missed)."""
        entry = self._entries.get(key_id)
        if entry is not None:
            expires, record = entry
            now = self._clock()
            ttl = self._ttl if record is not None else self._miss_ttl
            if now < expires and (max_age is None or now - (expires - ttl) <= max_age):
                metrics.cache_lookup("api_key", True)
                return record
        metrics.cache_lookup("api_key", False)
        pending = self._inflight.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        return await self._load(key_id)

    async def _load(self, key_id: str) -> KeyRecord | None:
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_id] = future
        generation = self._generation
        try:
            self.lookups += 1
            record = await self._lookup(key_id)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters may not exist
            raise
        finally:
            self._inflight.pop(key_id, None)
        if generation == self._generation:
            if len(self._entries) >= self._max:
                # Oldest insertions first (dict order); cheap and good enough for a cache.
                for stale in list(self._entries)[: self._max // 10 or 1]:
                    del self._entries[stale]
            ttl = self._ttl if record is not None else self._miss_ttl
            self._entries[key_id] = (self._clock() + ttl, record)
        future.set_result(record)
        return record

    def drop(self, key_id: str) -> None:
        self._generation += 1
        self._entries.pop(key_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
