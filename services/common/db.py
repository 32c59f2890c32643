"""PostgreSQL: a pool per replica, and versioned migrations applied at start.

Each service keeps its migrations as `services/<service>/migrations/NNNN_description.sql`.
`migrate` applies the missing ones in order, each in its own transaction, under an advisory
lock so that replicas starting together do not race; it refuses to run when an applied
migration's file changed (checksum), because that means two databases drifted apart.

`create_pool` makes the pool every service uses (`GuardedPool`): each unit of work on it goes
through the PostgreSQL circuit breaker and is bounded by the call's budget, so that with
PostgreSQL down or hung a call answers UNAVAILABLE within seconds instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from services.common.breaker import postgres_failure
from services.common.config import DatabaseConfig
from services.common.deadline import Budget
from services.common.dependency import Dependency
from services.common.errors import DeadlineExceeded, InvalidArgument

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x50_4D_41  # advisory lock key shared by every service's migrator


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_description.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return migrations


async def migrate(conn: asyncpg.Connection, service: str, directory: Path) -> list[int]:
    """Applies `directory`'s pending migrations for `service`; returns the versions applied."""
    migrations = load_migrations(directory)
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   service text NOT NULL, version int NOT NULL, name text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (service, version))"""
        )
        rows = await conn.fetch(
            "SELECT version, checksum FROM schema_migrations WHERE service = $1", service
        )
        done = {r["version"]: r["checksum"] for r in rows}
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{service} migration {migration.version:04d}_{migration.name} changed "
                        "after it was applied; add a new migration instead of editing one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (service, version, name, checksum) "
                    "VALUES ($1, $2, $3, $4)",
                    service,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration %s %04d_%s", service, migration.version, migration.name)
            applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied


async def open_pool(config: DatabaseConfig, service: str, migrations: Path) -> asyncpg.Pool:
    """Connects, applies migrations, and returns a pool."""
    pool = await asyncpg.create_pool(config.url, min_size=1, max_size=config.pool_max)
    async with pool.acquire() as conn:
        await migrate(conn, service, migrations)
    return pool


async def claim_request(
    conn: asyncpg.Connection,
    table: str,
    tenant: str,
    request_id: str,
    method: str,
    resource: str,
) -> bool:
    """Records an AIP-155 request id inside the caller's transaction, in `table` (columns
    tenant, request_id, method, resource; primary key (tenant, request_id)). True: first time
    (go ahead); False: a repeat of the same request (return the current resource, change
    nothing). A concurrent first attempt makes this wait until it commits."""
    if not request_id:
        return True
    inserted = await conn.fetchval(
        f"""INSERT INTO {table} (tenant, request_id, method, resource)
            VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
        tenant,
        request_id,
        method,
        resource,
    )
    if inserted:
        return True
    first = await conn.fetchrow(
        f"SELECT method, resource FROM {table} WHERE tenant = $1 AND request_id = $2",
        tenant,
        request_id,
    )
    if first is None or (first["method"], first["resource"]) != (method, resource):
        raise InvalidArgument(
            f"request_id {request_id} was already used for a different request; use a new "
            "UUID for each distinct request",
            field="request_id",
        )
    return False


# -- the pool every service uses: breaker and bounded waits around each unit of work ---------

POSTGRES = Dependency("postgres", "PostgreSQL", postgres_failure)


class GuardedPool(asyncpg.Pool):
    """An asyncpg pool whose every `acquire()` block — and so every `pool.fetch*` and
    `pool.execute`, which acquire internally — goes through the PostgreSQL circuit breaker
    and, once `bound()` was called, is bounded by `POSTGRES.budget()`.

    The bound covers acquiring, the block and releasing. It is enforced by closing the
    connection when time is up, not by cancelling the task: against a hung server (SIGSTOP,
    a dead network path) a cancelled query leaves asyncpg waiting for the server to confirm
    the cancel, and the block's ROLLBACK and the pool's reset wait behind it, for ever. A
    closed connection makes every pending and later operation on it fail at once.

    Until `bound()` (called once the service serves) blocks are not bounded: start-up
    migrations may wait on the advisory lock while another replica migrates.
    """

    bounded = False

    def bound(self) -> None:
        self.bounded = True

    def acquire(self, *, timeout: float | None = None) -> _GuardedAcquire:
        return _GuardedAcquire(self, timeout)


class _GuardedAcquire(asyncpg.pool.PoolAcquireContext):
    # asyncpg's own slots, typed for mypy
    pool: GuardedPool
    timeout: float | None
    connection: Any
    done: bool

    def __init__(self, pool: GuardedPool, timeout: float | None) -> None:
        super().__init__(pool, timeout)
        self.budget: Budget | None = None
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Any:
        if self.connection is not None or self.done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        started = time.monotonic()
        if self.pool.bounded:
            self.budget = POSTGRES.budget(self.timeout)
            self.timeout = self.budget.seconds  # asyncpg bounds acquire and release by it
        await POSTGRES.breaker.__aenter__()
        try:
            self.connection = await self.pool._acquire(self.timeout)
        except BaseException as error:
            if isinstance(error, TimeoutError) and self.budget is not None:
                await self._leave(POSTGRES.timed_out(self.budget), error)
            else:
                await self._leave(error, error)
            raise  # _leave raised unless the error passes through unchanged
        if self.budget is not None:
            left = self.budget.seconds - (time.monotonic() - started)
            self.timer = asyncio.get_running_loop().call_later(max(left, 0.0), self._expire)
        return self.connection

    def _expire(self) -> None:
        self.expired = True
        connection = self.connection
        if connection is not None and not connection.is_closed():
            log.warning(
                "PostgreSQL did not finish a unit of work within %.1fs; closing its connection",
                self.budget.seconds if self.budget else 0.0,
            )
            connection.terminate()  # also hands the holder back to the pool

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        connection, self.connection = self.connection, None
        try:
            await self.pool.release(connection)  # a no-op when _expire closed it
        except Exception as release_error:  # the work itself is done: report only this
            log.warning("PostgreSQL connection not released cleanly: %s", release_error)
        error = exc
        if exc is not None and self.expired and self.budget is not None:
            error = POSTGRES.timed_out(self.budget)  # whatever the closed connection raised
        await self._leave(error, exc)

    async def _leave(self, error: BaseException | None, cause: BaseException | None) -> None:
        """Reports the outcome to the breaker; raises the caller's answer for a failure
        (`cause`: what was raised in fact)."""
        await POSTGRES.breaker.__aexit__(type(error) if error else None, error, None)
        if error is None:
            return
        if isinstance(error, DeadlineExceeded) and error is not cause:
            raise error from cause
        replacement = POSTGRES.convert(error)
        if replacement is not None:
            raise replacement from cause

    def __await__(self) -> Any:
        # `conn = await pool.acquire()` (not used here): asyncpg's behaviour, no bound, since
        # nothing tells us when the work ends.
        return super().__await__()


async def create_pool(config: DatabaseConfig) -> GuardedPool:
    """The service's pool (asyncpg.create_pool's defaults, as a GuardedPool)."""
    pool = GuardedPool(
        config.url,
        min_size=1,
        max_size=config.pool_max,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    await pool
    return pool
