"""The Authenticator and its interceptor without infrastructure: an injected key lookup, locally
generated token keys, and a real grpc.aio server on port 0 for the interceptor."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2, status_pb2
from jwt.algorithms import ECAlgorithm

from services.common import apikeys
from services.common.auth.authn import (
    Authenticator,
    AuthnInterceptor,
    credential_from,
    narrow_scopes,
)
from services.common.auth.jwt_verify import JwtVerifier, KeySet
from services.common.auth.keycache import (
    STATE_ACTIVE,
    STATE_EXPIRED,
    STATE_REVOKED,
    KeyCache,
    KeyRecord,
)
from services.common.auth.principal import current_principal
from services.common.auth.settings import AuthConfig, load_auth_config
from services.common.config import ConfigError
from services.common.errors import Unauthenticated
from services.common.interceptors import STATUS_DETAILS_KEY, build_interceptors

PEPPER = b"k" * 32
KID = "soma-jwt-v1"


class Lookup:
    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.calls: list[str] = []

    async def __call__(self, key_id: str) -> KeyRecord | None:
        self.calls.append(key_id)
        await asyncio.sleep(0)
        return self.records.get(key_id)


def record_for(secret: str, **changes: Any) -> KeyRecord:
    parsed = apikeys.parse(secret)
    base = KeyRecord(
        key_id=parsed.key_id,
        tenant="acme",
        owner="user:alice",
        roles=frozenset({"member"}),
        scopes=frozenset({"*"}),
        secret_hash=apikeys.hash_secret(PEPPER, secret),
        previous_secret_hash=None,
        previous_secret_expire_time=None,
        state=STATE_ACTIVE,
        expire_time=None,
        usage_budget=None,
        rate_limit_per_minute=None,
    )
    return replace(base, **changes)


class Env:
    def __init__(self) -> None:
        self.lookup = Lookup()
        self.signing = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self.signing.public_key()))
        jwk.update(kid=KID, alg="ES256")

        async def source() -> dict[str, dict[str, Any]]:
            return {KID: jwk}

        self.auth = Authenticator(
            AuthConfig(),
            PEPPER,
            KeyCache(self.lookup, ttl=60),
            JwtVerifier(KeySet(source), "soma-mesh", "soma-mesh", max_lifetime=3600),
        )

    def add_key(self, **changes: Any) -> str:
        key = apikeys.generate("dev")
        self.lookup.records[key.key_id] = record_for(key.secret, **changes)
        return key.secret

    def token(self, secret: str, **overrides: Any) -> str:
        key_id = apikeys.parse(secret).key_id
        now = int(time.time())
        claims = {
            "iss": "soma-mesh",
            "aud": "soma-mesh",
            "sub": f"key:{key_id}",
            "key_id": key_id,
            "tenant": "acme",
            "roles": ["member"],
            "scope": "gateway:read",
            "owner": "user:alice",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            **overrides,
        }
        return jwt.encode(
            claims, self.signing, algorithm="ES256", headers={"kid": KID, "typ": "at+jwt"}
        )


@pytest.fixture
def env() -> Env:
    return Env()


async def expect(coro: Any, reason: str, secret: str | None = None) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as raised:
        await coro
    assert raised.value.reason == reason, raised.value.message
    if secret:
        assert secret not in raised.value.message
    return raised.value


# -- API keys -----------------------------------------------------------------------------


async def test_valid_key_gives_principal(env: Env) -> None:
    secret = env.add_key(roles=frozenset({"admin"}))
    principal = await env.auth.verify_api_key(secret)
    key_id = apikeys.parse(secret).key_id
    assert principal.subject == f"key:{key_id}" and principal.key_id == key_id
    assert principal.tenant == "acme" and principal.roles == {"admin"}
    assert principal.credential == "api_key" and principal.owner == "user:alice"


async def test_typo_or_bad_checksum_never_reaches_lookup(env: Env) -> None:
    secret = env.add_key()
    typo = secret[:20] + ("a" if secret[20] != "a" else "b") + secret[21:]
    bad_checksum = secret[:-1] + ("a" if secret[-1] != "a" else "b")
    for text in (typo, bad_checksum, secret[:-1], secret + "a", "soma_nonsense"):
        await expect(env.auth.verify_api_key(text), "CREDENTIALS_INVALID", secret)
    assert env.lookup.calls == []


async def test_key_of_another_env_never_reaches_lookup(env: Env) -> None:
    live = apikeys.generate("live").secret
    await expect(env.auth.verify_api_key(live), "CREDENTIALS_INVALID", live)
    assert env.lookup.calls == []


async def test_wrong_secret_and_unknown_key_look_the_same(env: Env) -> None:
    secret = env.add_key()
    forged = apikeys.generate("dev", key_id=apikeys.parse(secret).key_id).secret
    unknown = apikeys.generate("dev").secret
    a = await expect(env.auth.verify_api_key(forged), "CREDENTIALS_INVALID", forged)
    b = await expect(env.auth.verify_api_key(unknown), "CREDENTIALS_INVALID", unknown)
    assert a.message == b.message == "invalid API key"


async def test_revoked_and_expired(env: Env) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    revoked = env.add_key(state=STATE_REVOKED)
    expired = env.add_key(state=STATE_EXPIRED)
    lapsed = env.add_key(expire_time=past)
    await expect(env.auth.verify_api_key(revoked), "KEY_REVOKED", revoked)
    await expect(env.auth.verify_api_key(expired), "KEY_EXPIRED", expired)
    await expect(env.auth.verify_api_key(lapsed), "KEY_EXPIRED", lapsed)


async def test_wrong_secret_of_revoked_key_does_not_reveal_state(env: Env) -> None:
    secret = env.add_key(state=STATE_REVOKED)
    forged = apikeys.generate("dev", key_id=apikeys.parse(secret).key_id).secret
    await expect(env.auth.verify_api_key(forged), "CREDENTIALS_INVALID")


async def test_previous_secret_valid_during_grace_only(env: Env) -> None:
    old = apikeys.generate("dev")
    new = apikeys.generate("dev", key_id=old.key_id)
    grace_end = datetime.now(UTC) + timedelta(minutes=5)
    env.lookup.records[old.key_id] = record_for(
        new.secret,
        previous_secret_hash=apikeys.hash_secret(PEPPER, old.secret),
        previous_secret_expire_time=grace_end,
    )
    assert (await env.auth.verify_api_key(old.secret)).key_id == old.key_id
    assert (await env.auth.verify_api_key(new.secret)).key_id == old.key_id
    env.lookup.records[old.key_id] = replace(
        env.lookup.records[old.key_id],
        previous_secret_expire_time=datetime.now(UTC) - timedelta(seconds=1),
    )
    env.auth.drop_key(old.key_id)
    await expect(env.auth.verify_api_key(old.secret), "CREDENTIALS_INVALID", old.secret)
    await env.auth.verify_api_key(new.secret)


async def test_cache_single_flight_and_drop(env: Env) -> None:
    secret = env.add_key()
    key_id = apikeys.parse(secret).key_id
    await asyncio.gather(*(env.auth.verify_api_key(secret) for _ in range(20)))
    assert env.lookup.calls == [key_id]
    await env.auth.verify_api_key(secret)
    assert len(env.lookup.calls) == 1
    env.lookup.records[key_id] = replace(env.lookup.records[key_id], state=STATE_REVOKED)
    env.auth.drop_key(key_id)  # what a keys.revoked notice does
    await expect(env.auth.verify_api_key(secret), "KEY_REVOKED")
    assert len(env.lookup.calls) == 2


async def test_cache_ttl_and_unknown_ids() -> None:
    now = [0.0]
    lookup = Lookup()
    cache = KeyCache(lookup, ttl=60, miss_ttl=5, clock=lambda: now[0])
    assert await cache.get("a" * 16) is None
    assert await cache.get("a" * 16) is None
    assert len(lookup.calls) == 1
    now[0] = 6
    await cache.get("a" * 16)
    assert len(lookup.calls) == 2
    lookup.records["b" * 16] = record_for(apikeys.generate("dev", "b" * 16).secret)
    await cache.get("b" * 16)
    now[0] = 30
    await cache.get("b" * 16)
    await cache.get("b" * 16, max_age=5)  # NATS down: trust only recent entries
    assert len(lookup.calls) == 4
    now[0] = 100
    await cache.get("b" * 16)
    assert len(lookup.calls) == 5


async def test_drop_during_lookup_is_not_cached() -> None:
    gate = asyncio.Event()
    calls = []

    async def slow(key_id: str) -> KeyRecord | None:
        calls.append(key_id)
        await gate.wait()
        return None

    cache = KeyCache(slow)
    pending = asyncio.create_task(cache.get("c" * 16))
    await asyncio.sleep(0)
    cache.drop("c" * 16)
    gate.set()
    await pending
    await cache.get("c" * 16)
    assert len(calls) == 2


# -- tokens -------------------------------------------------------------------------------


async def test_token_principal_narrowed_by_key(env: Env) -> None:
    secret = env.add_key(roles=frozenset({"member"}), scopes=frozenset({"gateway:read"}))
    token = env.token(secret, roles=["member", "admin"], scope="*")
    principal = await env.auth.verify_credential(token)
    assert principal.credential == "jwt" and principal.token_kid == KID
    assert principal.roles == {"member"}  # admin is not (or no longer) the key's
    assert principal.scopes == {"gateway:read"}


async def test_token_of_revoked_or_unknown_key(env: Env) -> None:
    secret = env.add_key(state=STATE_REVOKED)
    await expect(env.auth.verify_credential(env.token(secret)), "KEY_REVOKED")
    ghost = apikeys.generate("dev").secret
    await expect(env.auth.verify_credential(env.token(ghost)), "KEY_REVOKED")


async def test_token_claims_must_fit_key(env: Env) -> None:
    secret = env.add_key()
    await expect(
        env.auth.verify_credential(env.token(secret, tenant="other")), "CREDENTIALS_INVALID"
    )
    await expect(
        env.auth.verify_credential(env.token(secret, sub="key:zzzzzzzzzzzzzzzz")),
        "CREDENTIALS_INVALID",
    )
    await expect(
        env.auth.verify_credential(env.token(secret, roles="admin")), "CREDENTIALS_INVALID"
    )


def test_narrow_scopes() -> None:
    star, read = frozenset({"*"}), frozenset({"gateway:read"})
    both = frozenset({"gateway:read", "keys:read"})
    assert narrow_scopes(star, read) == read
    assert narrow_scopes(read, star) == read
    assert narrow_scopes(both, read) == read
    assert narrow_scopes(frozenset({"keys:write"}), read) == frozenset()


# -- metadata -----------------------------------------------------------------------------


def test_credential_from_metadata() -> None:
    assert credential_from([("authorization", "Bearer abc")]) == "abc"
    assert credential_from([("authorization", "bearer  abc ")]) == "abc"
    assert credential_from([("x-api-key", "k")]) == "k"
    assert credential_from([("authorization", "Bearer a"), ("x-api-key", "b")]) == "a"
    assert credential_from([("x-other", "v"), ("x-bin", b"\x00")]) is None
    for bad in ("Basic dXNlcjpwdw==", "Bearer", "Bearer   "):
        with pytest.raises(Unauthenticated) as raised:
            credential_from([("authorization", bad)])
        assert raised.value.reason == "CREDENTIALS_INVALID"
        assert "dXNlcjpwdw" not in raised.value.message


async def test_missing_credentials(env: Env) -> None:
    await expect(env.auth.authenticate([]), "CREDENTIALS_MISSING")
    assert await env.auth.authenticate_optional([]) is None


def test_settings() -> None:
    config = load_auth_config({})
    assert config == AuthConfig()
    config = load_auth_config({"SOMA_ENV": "LIVE", "SOMA_JWT_ISSUER": "https://soma.example"})
    assert config.env == "live" and config.jwt_issuer == "https://soma.example"
    with pytest.raises(ConfigError):
        load_auth_config({"SOMA_ENV": "prod"})
    with pytest.raises(ConfigError):
        load_auth_config({"SOMA_OIDC_ISSUER": "https://idp"})
    oidc = load_auth_config({"SOMA_OIDC_ISSUER": "https://idp", "SOMA_OIDC_JWKS_URL": "https://j"})
    assert oidc.oidc is not None and oidc.oidc.audience == "soma-mesh"


# -- the interceptor on a real server -----------------------------------------------------


@pytest.fixture
async def server(env: Env) -> AsyncIterator[grpc.aio.Channel]:
    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        principal = current_principal.get()
        return (principal.subject if principal else "anonymous").encode()

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(2):
            principal = current_principal.get()
            yield (principal.subject if principal else "anonymous").encode()

    handlers = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Public": grpc.unary_unary_rpc_method_handler(who),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    interceptor = AuthnInterceptor(env.auth, public=lambda method: method.endswith("/Public"))
    srv = grpc.aio.server(interceptors=list(build_interceptors(authn=interceptor)))
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", handlers)])
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await srv.stop(0)


def _reason(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def test_interceptor(server: grpc.aio.Channel, env: Env) -> None:
    secret = env.add_key()
    subject = f"key:{apikeys.parse(secret).key_id}".encode()
    who = server.unary_unary("/test.Svc/Who")
    public = server.unary_unary("/test.Svc/Public")
    stream = server.unary_stream("/test.Svc/Stream")

    assert await who(b"", metadata=[("authorization", f"Bearer {secret}")]) == subject
    assert await who(b"", metadata=[("x-api-key", secret)]) == subject
    assert await who(b"", metadata=[("authorization", f"Bearer {env.token(secret)}")]) == subject
    assert [m async for m in stream(b"", metadata=[("x-api-key", secret)])] == [subject] * 2
    assert await public(b"") == b"anonymous"
    assert await public(b"", metadata=[("x-api-key", secret)]) == subject

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await who(b"")
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(raised.value) == "CREDENTIALS_MISSING"
    assert "x-api-key" in (raised.value.details() or "")

    bad = secret[:-1] + ("a" if secret[-1] != "a" else "b")
    for call, metadata in ((who, [("x-api-key", bad)]), (public, [("x-api-key", bad)])):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"", metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(raised.value) == "CREDENTIALS_INVALID"
        assert bad not in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [m async for m in stream(b"")]
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert current_principal.get() is None
