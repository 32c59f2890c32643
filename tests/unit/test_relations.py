"""RelationStore against a real Postgres (pgserver, session-scoped, under /tmp) with the shared
auth migration applied: the model's own test suite (policy/model.fga.yaml), roles_of, caching,
invalidation and writes."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from services.common.auth.migrations import AUTH_MIGRATIONS
from services.common.auth.relations import RelationStore
from services.common.db import migrate
from services.common.errors import AlreadyExists, InvalidArgument

MODEL_TESTS = Path(__file__).resolve().parents[2] / "policy" / "model.fga.yaml"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with warnings.catch_warnings():  # pgserver warns about XDG_RUNTIME_DIR at import
        warnings.simplefilter("ignore")
        import pgserver
    # Under /tmp, never /root: as root pgserver makes every parent of its data dir readable.
    root = Path(tempfile.mkdtemp(prefix="soma-relations-", dir="/tmp"))
    server = pgserver.get_server(root / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn, "auth", AUTH_MIGRATIONS)
    yield pool
    await pool.close()


@pytest.fixture
async def store(pool: asyncpg.Pool) -> AsyncIterator[RelationStore]:
    await pool.execute("TRUNCATE auth_role_bindings")
    yield RelationStore(pool)


def _tenant_of(subject: str, object_: str) -> str:
    for entity in (object_, subject):
        if entity.startswith("tenant:"):
            return entity.split(":", 1)[1]
    return "platform"


def _model_suite() -> dict[str, Any]:
    return yaml.safe_load(MODEL_TESTS.read_text())


async def test_model_suite_holds_for_the_store(store: RelationStore) -> None:
    suite = _model_suite()
    for t in suite["tuples"]:
        await store.write(_tenant_of(t["user"], t["object"]), t["user"], t["relation"], t["object"])
    checked = 0
    for test in suite["tests"]:
        for check in test["check"]:
            for relation, expected in check["assertions"].items():
                got = await store.check(check["user"], relation, check["object"])
                assert got is expected, f"{check['user']} {relation} {check['object']}"
                checked += 1
    assert checked == 46


async def test_roles_of(store: RelationStore) -> None:
    await store.write("acme", "user:alice", "admin", "tenant:acme")
    await store.write("acme", "user:alice", "auditor", "tenant:acme")
    await store.write("globex", "user:alice", "member", "tenant:globex")
    await store.write("platform", "user:alice", "admin", "platform:soma")
    await store.write("acme", "user:bob", "member", "tenant:acme")
    assert await store.roles_of("user:alice", "acme") == {"admin", "auditor", "platform_admin"}
    assert await store.roles_of("user:alice", "globex") == {"member", "platform_admin"}
    assert await store.roles_of("user:bob", "acme") == {"member"}
    assert await store.roles_of("user:bob", "globex") == frozenset()
    assert await store.roles_of("user:nobody", "acme") == frozenset()


async def test_cache_and_invalidate(store: RelationStore, pool: asyncpg.Pool) -> None:
    await store.write("acme", "user:bob", "member", "tenant:acme")
    assert await store.check("user:bob", "member", "tenant:acme")
    queries = store.queries
    assert await store.check("user:bob", "member", "tenant:acme")
    assert await store.roles_of("user:bob", "acme") == {"member"}
    assert store.queries == queries + 1  # roles_of looked at platform:soma only

    # Another replica deletes the binding: this one answers from its cache until told.
    await pool.execute("DELETE FROM auth_role_bindings WHERE subject = 'user:bob'")
    assert await store.check("user:bob", "member", "tenant:acme")
    store.invalidate()  # what the listener does on `bindings.changed`
    assert not await store.check("user:bob", "member", "tenant:acme")
    assert await store.roles_of("user:bob", "acme") == frozenset()


async def test_ttl_is_a_backstop(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE auth_role_bindings")
    now = [0.0]
    store = RelationStore(pool, ttl=60, clock=lambda: now[0])
    assert not await store.check("user:eve", "member", "tenant:acme")
    await RelationStore(pool).write("acme", "user:eve", "member", "tenant:acme")
    assert not await store.check("user:eve", "member", "tenant:acme")
    now[0] += 61
    assert await store.check("user:eve", "member", "tenant:acme")


async def test_write_and_delete(store: RelationStore) -> None:
    written = await store.write("acme", "tenant:acme", "owner", "capsule:hello")
    assert (written.tenant, written.subject, written.relation, written.object) == (
        "acme", "tenant:acme", "owner", "capsule:hello"
    )  # fmt: skip
    assert len(written.id) == 36 and written.create_time is not None
    with pytest.raises(AlreadyExists) as raised:
        await store.write("acme", "tenant:acme", "owner", "capsule:hello")
    assert raised.value.reason == "ROLE_BINDING_EXISTS"
    with pytest.raises(InvalidArgument):
        await store.write("acme", "user:alice", "owner", "tenant:acme")

    await store.write("acme", "user:bob", "member", "tenant:acme")
    assert await store.check("user:bob", "can_install", "capsule:hello")
    assert await store.delete("tenant:acme", "owner", "capsule:hello")
    assert not await store.delete("tenant:acme", "owner", "capsule:hello")
    assert not await store.check("user:bob", "can_install", "capsule:hello")
