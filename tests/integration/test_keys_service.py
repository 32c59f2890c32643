"""The Keys service in-process against real PostgreSQL, NATS and OpenBao.

The infrastructure comes from the mesh supervisor's Python API (no Python parts, no Envoy);
the Keys server runs in this process with the real error interceptor and a test-only
authentication stand-in: `x-test-principal: <json>` sets the caller, anything else goes through
the real Authenticator (so created keys are checked the way every service checks them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.json_format import MessageToDict
from grpc import aio

from services.common.apikeys import KEY_PATTERN
from services.common.auth.authn import Authenticator
from services.common.auth.principal import Principal, current_principal
from services.common.config import Config, load_config
from services.common.errors import SomaError
from services.common.events import Bus
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    build_interceptors,
    wrap_handler,
)
from services.common.runtime import open_runtime
from services.common.server import RunningServer, create_server
from services.keys import tokens
from services.keys.app import open_keys
from soma.keys.v1 import keys_pb2, keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as pb

pytestmark = pytest.mark.integration

ISSUER = AUDIENCE = "soma-mesh"


class FakeAuthnInterceptor(WrappingInterceptor):
    """Test only: the caller from `x-test-principal`, else from the real credentials."""

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self.auth = auth

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        async def principal(context: aio.ServicerContext) -> Principal | None:
            metadata = context.invocation_metadata() or ()
            for item in metadata:
                if item.key == "x-test-principal":
                    data = json.loads(item.value)
                    return Principal(
                        subject=data["subject"],
                        tenant=data["tenant"],
                        roles=frozenset(data["roles"]),
                        scopes=frozenset(data.get("scopes", ["*"])),
                        credential="api_key",
                        key_id=data.get("key_id"),
                        owner=data.get("owner"),
                    )
            return await self.auth.authenticate_optional(metadata)

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                token = current_principal.set(await principal(context))
                try:
                    return await behavior(request, context)
                finally:
                    current_principal.reset(token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            return behavior

        return wrap_handler(handler, around_unary, around_stream)


@dataclass
class KeysEnv:
    config: Config
    stub: keys_pb2_grpc.KeysServiceStub
    auth: Authenticator
    bus: Bus
    signer: tokens.TransitSigner


def who(
    tenant: str,
    *roles: str,
    subject: str = "user:root",
    owner: str | None = None,
    key_id: str | None = None,
    scopes: tuple[str, ...] = ("*",),
) -> tuple[tuple[str, str], ...]:
    body = {
        "tenant": tenant,
        "roles": list(roles),
        "subject": subject,
        "owner": owner,
        "key_id": key_id,
        "scopes": list(scopes),
    }
    return (("x-test-principal", json.dumps(body)),)


@pytest.fixture(scope="session")
async def keys_env() -> AsyncIterator[KeysEnv]:
    from services.mesh import Mesh, MeshOptions

    base = Path(tempfile.mkdtemp(prefix="soma-keys-it-", dir="/tmp"))
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "NATS_URL", "VAULT_ADDR", "VAULT_TOKEN"}
    }
    environ["SOMA_MESH_BOOTSTRAP"] = "0"
    mesh = Mesh(
        MeshOptions(
            data_dir=base / "data",
            port=0,
            admin_port=0,
            modules={"*": ""},
            with_envoy=False,
            environ=environ,
        )
    )
    await mesh.start()
    server: RunningServer | None = None
    try:
        env = {
            "DATABASE_URL": mesh.state.database_url,
            "NATS_URL": mesh.state.nats_url,
            "VAULT_ADDR": mesh.state.vault_addr,
            "VAULT_TOKEN": mesh.vault_token,
            "SOMA_PORT": "0",
        }
        config = load_config("keys", env)
        assert config.vault is not None
        runtime = await open_runtime(config, env, asyncio.Event())
        signer = tokens.TransitSigner(config.vault)
        parts = await open_keys(runtime, signer)
        server = await create_server(
            config,
            parts.service_names,
            parts.register,
            build_interceptors(authn=FakeAuthnInterceptor(runtime.auth)),
        )
        await server.set_serving(True)
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keys_pb2_grpc.KeysServiceStub(channel)
            yield KeysEnv(config, stub, runtime.auth, runtime.bus, signer)
        await server.server.stop(1)
        await parts.close()
        await runtime.close()
    finally:
        if server is not None:
            await server.server.stop(0)
        await mesh.stop()
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


async def fails(call: Awaitable[Any], code: grpc.StatusCode, text: str = "") -> str:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert text in (caught.value.details() or "")
    return caught.value.details() or ""


def tenant_id() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def create(env: KeysEnv, md: Any, **fields: Any) -> tuple[pb.ApiKey, str]:
    response = await env.stub.CreateApiKey(
        keys_pb2.CreateApiKeyRequest(api_key=pb.ApiKey(**fields)), metadata=md
    )
    return response.api_key, response.secret


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# -- API keys -----------------------------------------------------------------------------------


async def test_key_lifecycle_and_the_secret_is_shown_once(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    admin = who(t, "admin", subject="user:ann")
    key, secret = await create(env, admin, display_name="ci", scopes=["gateway:read"])
    assert re.match(KEY_PATTERN, secret) and key.key_id in secret
    assert key.name == f"keys/{key.key_id}" and key.tenant == t and key.owner == "user:ann"
    assert list(key.roles) == ["member"] and key.state == pb.API_KEY_STATE_ACTIVE
    assert secret.startswith(key.prefix)
    principal = await env.auth.verify_api_key(secret)
    assert (principal.tenant, principal.subject) == (t, f"key:{key.key_id}")

    got = await env.stub.GetApiKey(keys_pb2.GetApiKeyRequest(name=key.name), metadata=admin)
    assert secret not in str(MessageToDict(got)) and got.display_name == "ci"
    listed = await env.stub.ListApiKeys(keys_pb2.ListApiKeysRequest(), metadata=admin)
    assert [k.name for k in listed.api_keys] == [key.name]

    updated = await env.stub.UpdateApiKey(
        keys_pb2.UpdateApiKeyRequest(
            api_key=pb.ApiKey(name=key.name, display_name="ci-2", usage_budget=5, scopes=["x"]),
            update_mask=mask("display_name", "usage_budget"),
        ),
        metadata=admin,
    )
    assert (updated.display_name, updated.usage_budget, updated.remaining_calls) == ("ci-2", 5, 5)
    assert list(updated.scopes) == ["gateway:read"]  # not in the mask: unchanged
    for bad in ("*", "state", "owner"):
        await fails(
            env.stub.UpdateApiKey(
                keys_pb2.UpdateApiKeyRequest(
                    api_key=pb.ApiKey(name=key.name), update_mask=mask(bad)
                ),
                metadata=admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

    revoked = await env.stub.RevokeApiKey(
        keys_pb2.RevokeApiKeyRequest(name=key.name, reason="leaked"), metadata=admin
    )
    assert revoked.state == pb.API_KEY_STATE_REVOKED and revoked.HasField("revoke_time")
    with pytest.raises(SomaError):
        await env.auth.verify_api_key(secret)
    again = await env.stub.RevokeApiKey(keys_pb2.RevokeApiKeyRequest(name=key.name), metadata=admin)
    assert again.revoke_time == revoked.revoke_time
    await fails(
        env.stub.RotateApiKey(keys_pb2.RotateApiKeyRequest(name=key.name), metadata=admin),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await fails(
        env.stub.UpdateApiKey(
            keys_pb2.UpdateApiKeyRequest(
                api_key=pb.ApiKey(name=key.name, display_name="x"), update_mask=mask("display_name")
            ),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_request_id_repeat_returns_the_key_without_its_secret(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    admin = who(t, "admin")
    request = keys_pb2.CreateApiKeyRequest(
        api_key=pb.ApiKey(display_name="once"), request_id=str(uuid.uuid4())
    )
    first, second = await asyncio.gather(
        env.stub.CreateApiKey(request, metadata=admin),
        env.stub.CreateApiKey(request, metadata=admin),
    )
    assert first.api_key.name == second.api_key.name
    assert sorted([bool(first.secret), bool(second.secret)]) == [False, True]
    listed = await env.stub.ListApiKeys(keys_pb2.ListApiKeysRequest(), metadata=admin)
    assert len(listed.api_keys) == 1

    rotate = keys_pb2.RotateApiKeyRequest(name=first.api_key.name, request_id=str(uuid.uuid4()))
    rotated = await env.stub.RotateApiKey(rotate, metadata=admin)
    repeat = await env.stub.RotateApiKey(rotate, metadata=admin)
    assert rotated.secret and not repeat.secret
    assert repeat.api_key.rotate_time == rotated.api_key.rotate_time


async def test_cross_tenant_reads_are_not_found_and_writes_permission_denied(
    keys_env: KeysEnv,
) -> None:
    env, a, b = keys_env, tenant_id(), tenant_id()
    key, _ = await create(env, who(a, "admin"))
    other = who(b, "admin", "platform_admin")
    name = key.name
    missing = "keys/aaaaaaaaaaaaaaaa"
    for target in (name, missing):
        await fails(
            env.stub.GetApiKey(keys_pb2.GetApiKeyRequest(name=target), metadata=other),
            grpc.StatusCode.NOT_FOUND,
            f"key {target} does not exist",
        )
        writes = [
            env.stub.RevokeApiKey(keys_pb2.RevokeApiKeyRequest(name=target), metadata=other),
            env.stub.RotateApiKey(keys_pb2.RotateApiKeyRequest(name=target), metadata=other),
            env.stub.UpdateApiKey(
                keys_pb2.UpdateApiKeyRequest(
                    api_key=pb.ApiKey(name=target, display_name="x"),
                    update_mask=mask("display_name"),
                ),
                metadata=other,
            ),
        ]
        for write in writes:
            # Same answer whether the key exists elsewhere or nowhere: no existence leak.
            await fails(write, grpc.StatusCode.PERMISSION_DENIED, "not a key of tenant")
    listed = await env.stub.ListApiKeys(keys_pb2.ListApiKeysRequest(), metadata=other)
    assert name not in [k.name for k in listed.api_keys]
    got = await env.stub.GetApiKey(keys_pb2.GetApiKeyRequest(name=name), metadata=who(a, "admin"))
    assert got.state == pb.API_KEY_STATE_ACTIVE  # untouched


async def test_members_manage_only_their_own_keys(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    admin = who(t, "admin", subject="user:root")
    alice = who(t, "member", subject="key:aliceaaaaaaaaaaa", owner="user:alice")
    bob = who(t, "member", subject="key:bobbbbbbbbbbbbbb", owner="user:bob")
    alice_key, alice_secret = await create(env, alice, display_name="a")
    bob_key, _ = await create(env, bob, display_name="b")
    assert alice_key.owner == "user:alice"  # owned by the owner of the creating key
    await fails(
        env.stub.GetApiKey(keys_pb2.GetApiKeyRequest(name=bob_key.name), metadata=alice),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        env.stub.RevokeApiKey(keys_pb2.RevokeApiKeyRequest(name=bob_key.name), metadata=alice),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    mine = await env.stub.ListApiKeys(keys_pb2.ListApiKeysRequest(), metadata=alice)
    assert [k.name for k in mine.api_keys] == [alice_key.name]
    everyone = await env.stub.ListApiKeys(keys_pb2.ListApiKeysRequest(), metadata=admin)
    assert {k.name for k in everyone.api_keys} == {alice_key.name, bob_key.name}
    by_owner = await env.stub.ListApiKeys(
        keys_pb2.ListApiKeysRequest(owner="user:bob"), metadata=admin
    )
    assert [k.name for k in by_owner.api_keys] == [bob_key.name]

    # The real credential path: alice's own key sees itself.
    real = (("x-api-key", alice_secret),)
    got = await env.stub.GetApiKey(keys_pb2.GetApiKeyRequest(name=alice_key.name), metadata=real)
    assert got.name == alice_key.name

    await fails(create(env, alice, roles=["admin"]), grpc.StatusCode.PERMISSION_DENIED, "role")

    # A member key made with an admin's key belongs to the admin but cannot rotate (and so
    # take over) the admin's more powerful keys; it can rotate itself.
    ann = who(t, "admin", subject="key:annaaaaaaaaaaaa", owner="user:ann")
    ann_admin_key, _ = await create(env, ann, roles=["admin"])
    ci_key, ci_secret = await create(env, ann, display_name="ci")
    ci = (("x-api-key", ci_secret),)
    await fails(
        env.stub.RotateApiKey(keys_pb2.RotateApiKeyRequest(name=ann_admin_key.name), metadata=ci),
        grpc.StatusCode.PERMISSION_DENIED,
        "roles or scopes",
    )
    rotated = await env.stub.RotateApiKey(
        keys_pb2.RotateApiKeyRequest(name=ci_key.name), metadata=ci
    )
    assert rotated.secret
    narrow = who(t, "member", subject="key:cccccccccccccccc", scopes=("gateway:read",))
    narrowed, _ = await create(env, narrow)
    assert list(narrowed.scopes) == ["gateway:read"]  # defaults to the creator's scopes
    await fails(
        create(env, narrow, scopes=["gateway:write"]), grpc.StatusCode.PERMISSION_DENIED, "scope"
    )
    await fails(create(env, admin, scopes=["mail:read"]), grpc.StatusCode.INVALID_ARGUMENT)


async def test_paging_newest_first(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    admin = who(t, "admin")
    names = [(await create(env, admin, display_name=str(i)))[0].name for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await env.stub.ListApiKeys(
            keys_pb2.ListApiKeysRequest(page_size=2, page_token=token), metadata=admin
        )
        seen += [k.name for k in page.api_keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(names))
    await fails(
        env.stub.ListApiKeys(
            keys_pb2.ListApiKeysRequest(page_size=2, page_token=token or "bad"), metadata=admin
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_rotation_keeps_the_previous_secret_during_grace(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    admin = who(t, "admin")
    key, old = await create(env, admin)
    await env.auth.verify_api_key(old)  # cached now: the notice must drop it
    seen: list[str] = []

    async def on_msg(msg: Any) -> None:
        seen.append(f"{msg.subject} {json.loads(msg.data)['key_id']}")

    sub = await env.bus.nc.subscribe("keys.*", cb=on_msg)
    try:
        rotated = await env.stub.RotateApiKey(
            keys_pb2.RotateApiKeyRequest(name=key.name), metadata=admin
        )
        new = rotated.secret
        assert new != old and rotated.api_key.HasField("previous_secret_expire_time")
        assert (await env.auth.verify_api_key(old)).key_id == key.key_id  # grace
        assert (await env.auth.verify_api_key(new)).key_id == key.key_id
        now_only = await env.stub.RotateApiKey(
            keys_pb2.RotateApiKeyRequest(name=key.name, grace_period=duration_pb2.Duration()),
            metadata=admin,
        )
        assert not now_only.api_key.HasField("previous_secret_expire_time")
        for stale in (old, new):
            with pytest.raises(SomaError):
                await env.auth.verify_api_key(stale)
        await env.auth.verify_api_key(now_only.secret)
        await fails(
            env.stub.RotateApiKey(
                keys_pb2.RotateApiKeyRequest(
                    name=key.name, grace_period=duration_pb2.Duration(seconds=31 * 86400)
                ),
                metadata=admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        for _ in range(50):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.05)
        assert seen[:2] == [f"keys.rotated {key.key_id}"] * 2
    finally:
        await sub.unsubscribe()


# -- tokens -------------------------------------------------------------------------------------


async def jwks(env: KeysEnv) -> dict[str, Any]:
    keyset = await env.stub.GetJwks(keys_pb2.GetJwksRequest())
    return {k.kid: MessageToDict(k, preserving_proto_field_name=True) for k in keyset.keys}


def verify(token: str, keys: dict[str, Any], audience: str = AUDIENCE) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    return jwt.decode(
        token, jwt.PyJWK(keys[kid]).key, algorithms=["ES256"], audience=audience, issuer=ISSUER
    )


async def test_issue_token_verifies_against_the_jwks(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    key, secret = await create(
        env, who(t, "admin", subject="user:ann"), scopes=["gateway:read", "keys:read"]
    )
    issued = await env.stub.IssueToken(keys_pb2.IssueTokenRequest(api_key=secret))
    assert issued.token_type == "Bearer" and issued.expires_in == 600
    header = jwt.get_unverified_header(issued.access_token)
    assert header["alg"] == "ES256" and header["typ"] == "at+jwt"
    assert re.match(r"^soma-jwt-v\d+$", header["kid"])
    keys = await jwks(env)
    assert all(set(k) == {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in keys.values())
    claims = verify(issued.access_token, keys)
    assert claims["sub"] == f"key:{key.key_id}" and claims["tenant"] == t
    assert claims["roles"] == ["member"] and claims["scope"] == "gateway:read keys:read"
    assert claims["exp"] - claims["iat"] == 600 and claims["owner"] == "user:ann"
    assert claims["exp"] == issued.expire_time.seconds
    # The token authenticates like the key (the real verifier, RFC 8725 checks).
    principal = await env.auth.verify_token(issued.access_token)
    assert principal.key_id == key.key_id

    header_key = await env.stub.IssueToken(
        keys_pb2.IssueTokenRequest(
            scopes=["gateway:read"], ttl=duration_pb2.Duration(seconds=3600)
        ),
        metadata=(("x-api-key", secret),),
    )
    narrowed = verify(header_key.access_token, keys)
    assert narrowed["scope"] == "gateway:read" and header_key.expires_in == 3600
    bearer = await env.stub.IssueToken(
        keys_pb2.IssueTokenRequest(), metadata=(("authorization", f"Bearer {secret}"),)
    )
    assert verify(bearer.access_token, keys)["key_id"] == key.key_id

    bad = [
        (keys_pb2.IssueTokenRequest(api_key=secret, scopes=["audit:read"]), "PERMISSION_DENIED"),
        (keys_pb2.IssueTokenRequest(api_key=secret, audience="other"), "INVALID_ARGUMENT"),
        (
            keys_pb2.IssueTokenRequest(api_key=secret, ttl=duration_pb2.Duration(seconds=3601)),
            "INVALID_ARGUMENT",
        ),
        (keys_pb2.IssueTokenRequest(), "UNAUTHENTICATED"),
        (  # a typo in the last character (never the same character again)
            keys_pb2.IssueTokenRequest(api_key=secret[:-1] + ("b" if secret[-1] == "a" else "a")),
            "UNAUTHENTICATED",
        ),
    ]
    for request, code in bad:
        details = await fails(env.stub.IssueToken(request), grpc.StatusCode[code])
        assert secret not in details
    await env.stub.RevokeApiKey(
        keys_pb2.RevokeApiKeyRequest(name=key.name), metadata=who(t, "admin")
    )
    await fails(
        env.stub.IssueToken(keys_pb2.IssueTokenRequest(api_key=secret)),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_signing_key_rotation_keeps_old_tokens_valid(keys_env: KeysEnv) -> None:
    env, t = keys_env, tenant_id()
    _, secret = await create(env, who(t, "admin"))
    before = await env.stub.IssueToken(keys_pb2.IssueTokenRequest(api_key=secret))
    old_kid = jwt.get_unverified_header(before.access_token)["kid"]
    assert env.config.vault is not None
    new_kid = await asyncio.to_thread(tokens.rotate_signing_key, env.config.vault)
    assert tokens.version_of(new_kid) == tokens.version_of(old_kid) + 1
    # Another process rotated: this replica picks the new version up when its JWKS cache
    # expires (30 s); skip the wait here.
    env.signer.forget()
    after = await env.stub.IssueToken(keys_pb2.IssueTokenRequest(api_key=secret))
    assert jwt.get_unverified_header(after.access_token)["kid"] == new_kid
    keys = await jwks(env)
    assert list(keys)[:2] == [new_kid, old_kid]  # newest first
    assert env.auth.tokens is not None
    await env.auth.tokens.keys.load()  # its reload on an unknown kid is rate limited (10 s)
    for token in (before.access_token, after.access_token):
        verify(token, keys)
        await env.auth.verify_token(token)


# -- tenants and role bindings ------------------------------------------------------------------


async def test_tenants(keys_env: KeysEnv) -> None:
    env, home, new = keys_env, tenant_id(), tenant_id()
    platform = who(home, "platform_admin", "admin", subject="user:root")
    await fails(
        env.stub.CreateTenant(
            keys_pb2.CreateTenantRequest(tenant_id=new, tenant=pb.Tenant()),
            metadata=who(home, "admin"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    request = keys_pb2.CreateTenantRequest(
        tenant_id=new,
        tenant=pb.Tenant(display_name="New Co"),
        admin_subject="user:nina",
        request_id=str(uuid.uuid4()),
    )
    created = await env.stub.CreateTenant(request, metadata=platform)
    assert (created.name, created.display_name) == (f"tenants/{new}", "New Co")
    assert (await env.stub.CreateTenant(request, metadata=platform)).name == created.name
    await fails(
        env.stub.CreateTenant(
            keys_pb2.CreateTenantRequest(tenant_id=new, tenant=pb.Tenant()), metadata=platform
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    nina = who(new, "admin", subject="user:nina")
    bindings = await env.stub.ListRoleBindings(keys_pb2.ListRoleBindingsRequest(), metadata=nina)
    assert [(b.subject, b.relation, b.object) for b in bindings.role_bindings] == [
        ("user:nina", "admin", f"tenant:{new}")
    ]
    assert bindings.role_bindings[0].creator == "user:root"

    got = await env.stub.GetTenant(keys_pb2.GetTenantRequest(name=created.name), metadata=nina)
    assert got.display_name == "New Co"
    outsider = who(home, "admin")
    await fails(
        env.stub.GetTenant(keys_pb2.GetTenantRequest(name=created.name), metadata=outsider),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        env.stub.UpdateTenant(
            keys_pb2.UpdateTenantRequest(
                tenant=pb.Tenant(name=created.name, enterprise_mode=True),
                update_mask=mask("enterprise_mode"),
            ),
            metadata=outsider,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    updated = await env.stub.UpdateTenant(
        keys_pb2.UpdateTenantRequest(
            tenant=pb.Tenant(name=created.name, enterprise_mode=True, display_name="ignored"),
            update_mask=mask("enterprise_mode"),
        ),
        metadata=nina,
    )
    assert updated.enterprise_mode and updated.display_name == "New Co"
    mine = await env.stub.ListTenants(keys_pb2.ListTenantsRequest(), metadata=nina)
    assert [x.name for x in mine.tenants] == [created.name]
    everything = await env.stub.ListTenants(keys_pb2.ListTenantsRequest(), metadata=platform)
    assert created.name in [x.name for x in everything.tenants]


async def test_role_bindings(keys_env: KeysEnv) -> None:
    env, t, other = keys_env, tenant_id(), tenant_id()
    admin = who(t, "admin", subject="user:root")

    def binding(subject: str, relation: str, obj: str) -> keys_pb2.CreateRoleBindingRequest:
        return keys_pb2.CreateRoleBindingRequest(
            role_binding=pb.RoleBinding(subject=subject, relation=relation, object=obj)
        )

    first = await env.stub.CreateRoleBinding(
        binding("user:a", "admin", f"tenant:{t}"), metadata=admin
    )
    assert first.tenant == t and first.creator == "user:root"
    await fails(
        env.stub.CreateRoleBinding(binding("user:a", "admin", f"tenant:{t}"), metadata=admin),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await fails(
        env.stub.CreateRoleBinding(binding("user:a", "admin", f"tenant:{other}"), metadata=admin),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await fails(
        env.stub.CreateRoleBinding(binding("user:a", "admin", "platform:soma"), metadata=admin),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await fails(
        env.stub.CreateRoleBinding(binding("user:a", "owner", "capsule:x"), metadata=admin),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await fails(
        env.stub.CreateRoleBinding(
            binding("user:b", "member", f"tenant:{t}"), metadata=who(t, "member")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await fails(
        env.stub.CreateRoleBinding(binding("user:b", "root", f"tenant:{t}"), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await fails(
        env.stub.DeleteRoleBinding(
            keys_pb2.DeleteRoleBindingRequest(name=first.name), metadata=admin
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "last admin",
    )
    outsider = who(other, "admin")
    await fails(
        env.stub.GetRoleBinding(keys_pb2.GetRoleBindingRequest(name=first.name), metadata=outsider),
        grpc.StatusCode.NOT_FOUND,
    )
    await fails(
        env.stub.DeleteRoleBinding(
            keys_pb2.DeleteRoleBindingRequest(name=first.name), metadata=outsider
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    second = await env.stub.CreateRoleBinding(
        binding("user:b", "admin", f"tenant:{t}"), metadata=admin
    )
    member = await env.stub.CreateRoleBinding(
        binding("user:c", "approver", f"tenant:{t}"), metadata=admin
    )
    listed = await env.stub.ListRoleBindings(
        keys_pb2.ListRoleBindingsRequest(relation="admin"), metadata=admin
    )
    assert [b.name for b in listed.role_bindings] == [first.name, second.name]  # oldest first
    delete = keys_pb2.DeleteRoleBindingRequest(name=first.name, request_id=str(uuid.uuid4()))
    await env.stub.DeleteRoleBinding(delete, metadata=admin)
    await env.stub.DeleteRoleBinding(delete, metadata=admin)  # a repeat is fine
    await fails(
        env.stub.GetRoleBinding(keys_pb2.GetRoleBindingRequest(name=first.name), metadata=admin),
        grpc.StatusCode.NOT_FOUND,
    )
    got = await env.stub.GetRoleBinding(
        keys_pb2.GetRoleBindingRequest(name=member.name), metadata=admin
    )
    assert got.relation == "approver"
