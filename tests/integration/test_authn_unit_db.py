"""Authentication against real PostgreSQL, NATS and OpenBao (started here, not a whole mesh):
key cache + revocation notices, budget, rate limit, rotation grace, last-used batching, the
pepper creation race, tokens signed by OpenBao transit."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import hvac
import pytest

from services.common import apikeys, vault
from services.common.auth.authn import Authenticator
from services.common.auth.keycache import STATE_ACTIVE, STATE_REVOKED
from services.common.auth.migrations import AUTH_MIGRATIONS
from services.common.auth.revocation import KEY_REVOKED, KEY_ROTATED, publish_key_change
from services.common.auth.settings import AuthConfig
from services.common.config import Config, VaultConfig, load_config
from services.common.db import migrate
from services.common.errors import ResourceExhausted, Unauthenticated
from services.common.events import Bus, connect

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start")
        time.sleep(0.1)


@dataclass
class Infra:
    database_url: str
    nats_url: str
    vault: VaultConfig

    def config(self) -> Config:
        return load_config(
            "gateway",
            {
                "DATABASE_URL": self.database_url,
                "NATS_URL": self.nats_url,
                "VAULT_ADDR": self.vault.addr,
                "VAULT_TOKEN": self.vault.token,
            },
        )


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    base = Path(tempfile.mkdtemp(prefix="soma-authn-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    pg = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            pg = pgserver.get_server(base / "pg", cleanup_mode="stop")
        nats_port, bao_port = free_port(), free_port()
        log = open(base / "procs.log", "wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port)],
                stdout=log,
                stderr=log,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "bao"),
                    "server",
                    "-dev",
                    "-dev-root-token-id=soma-test-root",
                    f"-dev-listen-address=127.0.0.1:{bao_port}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        addr = f"http://127.0.0.1:{bao_port}"
        wait_for(lambda: urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=1), "OpenBao")
        wait_for(lambda: socket.create_connection(("127.0.0.1", nats_port), 1), "NATS")
        client = hvac.Client(url=addr, token="soma-test-root")
        client.sys.enable_secrets_engine("transit", path="transit")
        yield Infra(
            pg.get_uri(), f"nats://127.0.0.1:{nats_port}", VaultConfig(addr, "soma-test-root")
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(infra.database_url, min_size=1, max_size=8)
    async with pool.acquire() as conn:
        await migrate(conn, "auth", AUTH_MIGRATIONS)
        assert await migrate(conn, "auth", AUTH_MIGRATIONS) == []  # idempotent
    yield pool
    await pool.close()


SETTINGS = AuthConfig(last_used_flush_seconds=0.3, jwks_reload_min_seconds=0.5)


@pytest.fixture
async def replicas(infra: Infra, pool: asyncpg.Pool) -> AsyncIterator[list[Authenticator]]:
    """Two authenticators with their own NATS connections, as two replicas would have."""
    buses: list[Bus] = []
    auths = []
    for i in range(2):
        bus = await connect(infra.config().nats, f"authn-test-{i}")
        buses.append(bus)
        auths.append(await Authenticator.open(infra.config(), pool, bus, SETTINGS))
    yield auths
    for auth in auths:
        await auth.close()
    for bus in buses:
        await bus.close()


async def insert_key(pool: asyncpg.Pool, infra: Infra, **columns: Any) -> str:
    pepper = await vault.load_pepper_async(infra.vault)
    key = apikeys.generate("dev")
    row = {
        "id": key.key_id,
        "tenant": "acme",
        "owner": "user:alice",
        "scopes": ["*"],
        "roles": ["member"],
        "secret_hash": apikeys.hash_secret(pepper, key.secret),
        "state": STATE_ACTIVE,
        **columns,
    }
    names = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await pool.execute(f"INSERT INTO auth_api_keys ({names}) VALUES ({params})", *row.values())
    return key.secret


def key_id(secret: str) -> str:
    return apikeys.parse(secret).key_id


async def eventually_refused(auth: Authenticator, secret: str, reason: str) -> float:
    started = time.monotonic()
    while True:
        try:
            await auth.verify_api_key(secret)
        except Unauthenticated as error:
            assert error.reason == reason
            return time.monotonic() - started
        if time.monotonic() - started > 2:
            raise AssertionError("key still accepted 2 s after the notice")
        await asyncio.sleep(0.01)


# -- tests ----------------------------------------------------------------------------------


def test_pepper_created_once_under_a_race(infra: Infra) -> None:
    path = f"soma/test-pepper-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(8) as threads:
        peppers = list(threads.map(lambda _: vault.load_pepper(infra.vault, path), range(16)))
    assert len(set(peppers)) == 1 and len(peppers[0]) == 32
    c = hvac.Client(url=infra.vault.addr, token=infra.vault.token)
    meta = c.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    assert meta["data"]["metadata"]["version"] == 1  # created exactly once


def test_vault_retries_then_gives_up_quickly() -> None:
    dead = VaultConfig(f"http://127.0.0.1:{free_port()}", "x")
    started = time.monotonic()
    with pytest.raises(vault.VaultUnavailable):
        vault.with_retry(lambda: vault.client(dead).sys.read_health_status(), "test", seconds=0.5)
    assert time.monotonic() - started < 3


async def test_cache_and_revocation_notice(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    a, b = replicas
    secret = await insert_key(pool, infra)
    for auth in replicas:
        assert (await auth.verify_api_key(secret)).tenant == "acme"
    lookups = b.keys.lookups
    await b.verify_api_key(secret)
    assert b.keys.lookups == lookups  # served from memory
    await pool.execute("UPDATE auth_api_keys SET state = $2 WHERE id = $1", key_id(secret), 2)
    assert (await b.verify_api_key(secret)).key_id  # still cached: only the notice drops it
    # A third connection publishes, so nothing but NATS can tell replica b.
    other = await connect(infra.config().nats, "publisher")
    try:
        await other.nc.publish(KEY_REVOKED, json.dumps({"key_id": key_id(secret)}).encode())
        await other.nc.flush()
        latency = await eventually_refused(b, secret, "KEY_REVOKED")
        assert latency < 1
        await eventually_refused(a, secret, "KEY_REVOKED")
    finally:
        await other.close()


async def test_publish_key_change_drops_locally_at_once(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    a, _ = replicas
    secret = await insert_key(pool, infra)
    await a.verify_api_key(secret)
    await pool.execute("UPDATE auth_api_keys SET state = 2 WHERE id = $1", key_id(secret))
    assert a.listener is not None
    await publish_key_change(a.listener._bus, KEY_REVOKED, key_id(secret))
    with pytest.raises(Unauthenticated) as raised:
        await a.verify_api_key(secret)  # no wait: the publisher's own cache dropped it
    assert raised.value.reason == "KEY_REVOKED"


async def test_reconnect_clears_cache(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    a, _ = replicas
    secret = await insert_key(pool, infra)
    await a.verify_api_key(secret)
    assert len(a.keys) > 0
    assert a.listener is not None
    a.listener._bus.nc.stats["reconnects"] += 1  # as nats-py counts a reconnect
    lookups = a.keys.lookups
    await a.verify_api_key(secret)
    assert a.keys.lookups == lookups + 1


async def test_usage_budget_is_exact_across_replicas(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    secret = await insert_key(pool, infra, usage_budget=10, remaining_calls=10)
    results = await asyncio.gather(
        *(replicas[i % 2].verify_api_key(secret) for i in range(25)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(ok) == 10 and len(refused) == 15
    assert refused[0].reason == "USAGE_BUDGET_EXHAUSTED" and secret not in refused[0].message
    left = await pool.fetchval(
        "SELECT remaining_calls FROM auth_api_keys WHERE id = $1", key_id(secret)
    )
    assert left == 0


async def test_unlimited_key_costs_no_query(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    secret = await insert_key(pool, infra, usage_budget=0, remaining_calls=0)
    for _ in range(3):
        await replicas[0].verify_api_key(secret)
    rows = await pool.fetchval(
        "SELECT count(*) FROM auth_rate_windows WHERE key_id = $1", key_id(secret)
    )
    assert rows == 0


async def test_rate_limit_per_minute(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    # Not across a minute boundary: the window would reset mid-test.
    now = datetime.now(UTC)
    if now.second >= 57:
        await asyncio.sleep(61 - now.second)
    secret = await insert_key(pool, infra, rate_limit_per_minute=5)
    for i in range(5):
        await replicas[i % 2].verify_api_key(secret)
    with pytest.raises(ResourceExhausted) as raised:
        await replicas[0].verify_api_key(secret)
    assert raised.value.reason == "RATE_LIMITED"
    assert raised.value.retry_after_seconds is not None
    assert 0 < raised.value.retry_after_seconds <= 60
    assert secret not in raised.value.message


async def test_rotation_grace(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    a, b = replicas
    old = await insert_key(pool, infra)
    pepper = await vault.load_pepper_async(infra.vault)
    new = apikeys.generate("dev", key_id=key_id(old)).secret
    await a.verify_api_key(old)
    # What RotateApiKey does: new hash, old one kept until the grace period ends, a notice.
    await pool.execute(
        "UPDATE auth_api_keys SET previous_secret_hash = secret_hash, secret_hash = $2, "
        "previous_secret_expire_time = now() + interval '1 hour', rotate_time = now() "
        "WHERE id = $1",
        key_id(old),
        apikeys.hash_secret(pepper, new),
    )
    await publish_key_change(a.listener._bus, KEY_ROTATED, key_id(old))  # type: ignore[union-attr]
    for auth in (a, b):
        assert (await auth.verify_api_key(new)).key_id == key_id(old)
        assert (await auth.verify_api_key(old)).key_id == key_id(old)
    await pool.execute(
        "UPDATE auth_api_keys SET previous_secret_expire_time = now() - interval '1 second' "
        "WHERE id = $1",
        key_id(old),
    )
    await publish_key_change(a.listener._bus, KEY_ROTATED, key_id(old))  # type: ignore[union-attr]
    await eventually_refused(b, old, "CREDENTIALS_INVALID")
    await b.verify_api_key(new)


async def test_last_used_is_batched(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    secrets = [await insert_key(pool, infra) for _ in range(3)]
    for secret in secrets:
        await replicas[0].verify_api_key(secret)
    ids = [key_id(s) for s in secrets]
    query = "SELECT count(last_used_time) FROM auth_api_keys WHERE id = ANY($1::text[])"
    assert await pool.fetchval(query, ids) == 0  # not per call
    deadline = time.monotonic() + 3
    while await pool.fetchval(query, ids) < 3:
        assert time.monotonic() < deadline, "last_used_time not flushed"
        await asyncio.sleep(0.05)


async def test_transit_tokens_and_signing_key_rotation(
    replicas: list[Authenticator], pool: asyncpg.Pool, infra: Infra
) -> None:
    a, _ = replicas
    secret = await insert_key(pool, infra, roles=["member", "approver"])
    c = hvac.Client(url=infra.vault.addr, token=infra.vault.token)
    try:
        c.secrets.transit.create_key(name="soma-jwt", key_type="ecdsa-p256")
    except hvac.exceptions.InvalidRequest:
        pass

    def token(version: int, **overrides: Any) -> str:
        now = int(time.time())
        header = {"alg": "ES256", "typ": "at+jwt", "kid": f"soma-jwt-v{version}"}
        claims = {
            "iss": "soma-mesh",
            "aud": "soma-mesh",
            "sub": f"key:{key_id(secret)}",
            "key_id": key_id(secret),
            "tenant": "acme",
            "roles": ["member"],
            "scope": "gateway:read",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            **overrides,
        }

        def b64(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        data = f"{b64(header)}.{b64(claims)}"
        signed = c.secrets.transit.sign_data(
            name="soma-jwt",
            hash_input=base64.b64encode(data.encode()).decode(),
            key_version=version,
            hash_algorithm="sha2-256",
            marshaling_algorithm="jws",
        )["data"]["signature"]
        return f"{data}.{signed.split(':', 2)[2].rstrip('=')}"

    v1 = token(1)
    principal = await a.verify_credential(v1)
    assert principal.credential == "jwt" and principal.token_kid == "soma-jwt-v1"
    assert principal.roles == {"member"} and principal.scopes == {"gateway:read"}
    c.secrets.transit.rotate_key(name="soma-jwt")
    version = int(c.secrets.transit.read_key(name="soma-jwt")["data"]["latest_version"])
    await asyncio.sleep(SETTINGS.jwks_reload_min_seconds)
    assert (await a.verify_credential(token(version))).token_kid == f"soma-jwt-v{version}"
    assert (await a.verify_credential(v1)).key_id == key_id(secret)  # still valid until exp
    # Revoking the key refuses its tokens too.
    await pool.execute("UPDATE auth_api_keys SET state = $2 WHERE id = $1", key_id(secret), 2)
    await publish_key_change(a.listener._bus, KEY_REVOKED, key_id(secret))  # type: ignore[union-attr]
    with pytest.raises(Unauthenticated) as raised:
        await a.verify_credential(v1)
    assert raised.value.reason == "KEY_REVOKED"
    assert STATE_REVOKED == 2
