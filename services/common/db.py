"""PostgreSQL: a pool per replica, and versioned migrations applied at start.

Each service keeps its migrations as `services/<service>/migrations/NNNN_description.sql`.
`migrate` applies the missing ones in order, each in its own transaction, under an advisory
lock so that replicas starting together do not race; it refuses to run when an applied
migration's file changed (checksum), because that means two databases drifted apart.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.common.config import DatabaseConfig

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
