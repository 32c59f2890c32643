"""API keys and tokens end to end through Envoy: lifecycle, revocation on every replica,
rotation grace, limits, JWT attacks, tenant isolation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hvac
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import duration_pb2

from services.mesh.openbao import root_token
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gpb
from soma.keys.v1 import keys_pb2 as k
from soma.keys.v1 import keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as kpb
from tests.integration.harness import MeshRunner, http_request

pytestmark = pytest.mark.integration


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


@pytest.fixture(scope="module")
def admin(mesh: MeshRunner) -> str:
    return mesh.create_key()


@pytest.fixture(scope="module")
def other_admin(mesh: MeshRunner) -> str:
    return mesh.create_key(tenant="other", roles=("admin",))


@pytest.fixture
async def channel(mesh: MeshRunner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as ch:
        yield ch


async def new_key(
    channel: grpc.aio.Channel, mesh: MeshRunner, admin: str, **fields: Any
) -> tuple[kpb.ApiKey, str]:
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    created = await keys.CreateApiKey(
        k.CreateApiKeyRequest(api_key=kpb.ApiKey(display_name="t", **fields)),
        metadata=bearer(admin),
    )
    mesh.secrets.append(created.secret)
    return created.api_key, created.secret


async def gateway_status(channel: grpc.aio.Channel, secret: str) -> grpc.StatusCode:
    try:
        await gateway_pb2_grpc.GatewayServiceStub(channel).ListSessions(
            g.ListSessionsRequest(page_size=1), metadata=bearer(secret), timeout=5
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_key_lifecycle_grpc_and_rest(mesh: MeshRunner, admin: str, channel) -> None:  # type: ignore[no-untyped-def]
    key, secret = await new_key(channel, mesh, admin, roles=["member"])
    assert key.name == f"keys/{key.key_id}" and secret.startswith("soma_")
    assert await gateway_status(channel, secret) == grpc.StatusCode.OK
    for header in ({"authorization": f"Bearer {secret}"}, {"x-api-key": secret}):
        assert http_request(mesh.port, "GET", "/v1/sessions", headers=header).status == 200
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    got = await keys.GetApiKey(k.GetApiKeyRequest(name=key.name), metadata=bearer(admin))
    assert got.key_id == key.key_id and secret not in str(got)
    await keys.RevokeApiKey(k.RevokeApiKeyRequest(name=key.name), metadata=bearer(admin))
    assert await gateway_status(channel, secret) == grpc.StatusCode.UNAUTHENTICATED
    resp = http_request(mesh.port, "GET", "/v1/sessions", headers={"x-api-key": secret})
    assert resp.status == 401 and resp.json()["code"] == 16
    assert secret not in resp.body.decode()


async def test_revocation_reaches_every_replica_within_a_second(
    mesh: MeshRunner, admin: str, channel
) -> None:  # type: ignore[no-untyped-def]
    key, secret = await new_key(channel, mesh, admin, roles=["member"])
    replicas = [mesh.part(f"gateway-{i}")["address"] for i in range(mesh.replicas)]
    direct = [grpc.aio.insecure_channel(address) for address in replicas]
    try:
        for ch in direct:  # every replica has the key in its cache now
            assert await gateway_status(ch, secret) == grpc.StatusCode.OK
        keys = keys_pb2_grpc.KeysServiceStub(channel)
        await keys.RevokeApiKey(k.RevokeApiKeyRequest(name=key.name), metadata=bearer(admin))
        revoked_at = time.monotonic()
        for ch in direct:
            while await gateway_status(ch, secret) != grpc.StatusCode.UNAUTHENTICATED:
                assert time.monotonic() - revoked_at < 1.0, "revocation took over 1 s"
                await asyncio.sleep(0.02)
    finally:
        for ch in direct:
            await ch.close()


async def test_rotation_keeps_the_old_secret_for_the_grace_period(
    mesh: MeshRunner, admin: str, channel
) -> None:  # type: ignore[no-untyped-def]
    key, old = await new_key(channel, mesh, admin, roles=["member"])
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    rotated = await keys.RotateApiKey(
        k.RotateApiKeyRequest(name=key.name, grace_period=duration_pb2.Duration(seconds=2)),
        metadata=bearer(admin),
    )
    mesh.secrets.append(rotated.secret)
    assert rotated.secret != old
    assert await gateway_status(channel, rotated.secret) == grpc.StatusCode.OK
    assert await gateway_status(channel, old) == grpc.StatusCode.OK  # within the grace period
    await asyncio.sleep(2.5)
    assert await gateway_status(channel, old) == grpc.StatusCode.UNAUTHENTICATED
    assert await gateway_status(channel, rotated.secret) == grpc.StatusCode.OK


async def test_usage_budget_and_rate_limit(mesh: MeshRunner, admin: str, channel) -> None:  # type: ignore[no-untyped-def]
    _, budgeted = await new_key(channel, mesh, admin, roles=["member"], usage_budget=3)
    codes = [await gateway_status(channel, budgeted) for _ in range(4)]
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    resp = http_request(mesh.port, "GET", "/v1/sessions", headers={"x-api-key": budgeted})
    assert resp.status == 429 and resp.json()["code"] == 8

    _, limited = await new_key(channel, mesh, admin, roles=["member"], rate_limit_per_minute=5)
    codes = [await gateway_status(channel, limited) for _ in range(6)]
    assert codes == [grpc.StatusCode.OK] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    resp = http_request(mesh.port, "GET", "/v1/sessions", headers={"x-api-key": limited})
    assert resp.status == 429
    retry = [d for d in resp.json()["details"] if d["@type"].endswith("RetryInfo")]
    assert retry, resp.json()


async def test_a_key_with_a_typo_is_refused(mesh: MeshRunner, admin: str, channel) -> None:  # type: ignore[no-untyped-def]
    typo = admin[:-1] + ("a" if admin[-1] != "a" else "b")
    assert await gateway_status(channel, typo) == grpc.StatusCode.UNAUTHENTICATED
    resp = http_request(mesh.port, "GET", "/v1/sessions", headers={"x-api-key": typo})
    assert resp.status == 401 and typo not in resp.body.decode()


async def test_tenants_never_see_each_other(
    mesh: MeshRunner, admin: str, other_admin: str, channel
) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_pb2_grpc.GatewayServiceStub(channel)
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    mine = await gw.CreateSession(
        g.CreateSessionRequest(session=gpb.Session()), metadata=bearer(admin)
    )
    my_key, _ = await new_key(channel, mesh, admin, roles=["member"])
    them = bearer(other_admin)

    async def code(coro) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
        try:
            result = coro
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    nf, pd = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
    assert await code(gw.GetSession(g.GetSessionRequest(name=mine.name), metadata=them)) == nf
    assert await code(gw.ListMessages(g.ListMessagesRequest(parent=mine.name), metadata=them)) == nf
    assert (
        await code(
            gw.StreamSessionEvents(
                g.StreamSessionEventsRequest(session=mine.name), metadata=them, timeout=5
            )
        )
        == nf
    )
    assert (
        await code(
            gw.SendMessage(
                g.SendMessageRequest(parent=mine.name, message=gpb.Message(content="x")),
                metadata=them,
            )
        )
        == pd
    )
    assert await code(gw.CloseSession(g.CloseSessionRequest(name=mine.name), metadata=them)) == pd
    listed = await gw.ListSessions(g.ListSessionsRequest(page_size=500), metadata=them)
    assert mine.name not in [s.name for s in listed.sessions]
    assert all(s.tenant == "other" for s in listed.sessions)

    assert await code(keys.GetApiKey(k.GetApiKeyRequest(name=my_key.name), metadata=them)) == nf
    assert (
        await code(keys.RevokeApiKey(k.RevokeApiKeyRequest(name=my_key.name), metadata=them)) == pd
    )
    assert (
        await code(keys.RotateApiKey(k.RotateApiKeyRequest(name=my_key.name), metadata=them)) == pd
    )
    keys_listed = await keys.ListApiKeys(k.ListApiKeysRequest(page_size=500), metadata=them)
    assert my_key.name not in [x.name for x in keys_listed.api_keys]

    header = {"x-api-key": other_admin}
    assert http_request(mesh.port, "GET", f"/v1/{mine.name}", headers=header).status == 404
    resp = http_request(mesh.port, "POST", f"/v1/{mine.name}:close", {}, headers=header)
    assert resp.status == 403 and resp.json()["code"] == 7
    # still intact for its owner
    again = await gw.GetSession(g.GetSessionRequest(name=mine.name), metadata=bearer(admin))
    assert again.state == gpb.SESSION_STATE_ACTIVE


# -- tokens ---------------------------------------------------------------------------------


async def issue(channel: grpc.aio.Channel, mesh: MeshRunner, secret: str, **kw: Any) -> str:
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    token = (await keys.IssueToken(k.IssueTokenRequest(api_key=secret, **kw))).access_token
    mesh.secrets.append(token)
    return token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(mesh: MeshRunner, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with a REAL signature from the mesh's transit key (via the OpenBao root token),
    so that only the property under test is wrong."""
    state = mesh.state() or {}
    client = hvac.Client(
        url=state["vault_addr"], token=root_token(mesh.data_dir / "openbao" / "init.json")
    )
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signed = client.secrets.transit.sign_data(
        name="soma-jwt",
        hash_input=base64.b64encode(signing_input.encode()).decode(),
        marshaling_algorithm="jws",
        hash_algorithm="sha2-256",
    )
    signature = signed["data"]["signature"].split(":", 2)[2]
    token = f"{signing_input}.{signature}"
    mesh.secrets.append(token)
    return token


async def test_tokens_work_and_forgeries_do_not(mesh: MeshRunner, admin: str, channel) -> None:  # type: ignore[no-untyped-def]
    _, secret = await new_key(channel, mesh, admin, roles=["member"])
    token = await issue(channel, mesh, secret)
    assert await gateway_status(channel, token) == grpc.StatusCode.OK
    assert (
        http_request(
            mesh.port, "GET", "/v1/sessions", headers={"authorization": f"Bearer {token}"}
        ).status
        == 200
    )

    jwks = http_request(mesh.port, "GET", "/.well-known/jwks.json").json()
    assert jwks == http_request(mesh.port, "GET", "/v1/jwks").json()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["typ"] == "at+jwt"
    jwk = next(key for key in jwks["keys"] if key["kid"] == header["kid"])
    public = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(jwk))
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="soma-mesh")
    assert claims["tenant"] == "default" and claims["sub"].startswith("key:")

    now = int(time.time())
    good_header = {"alg": "ES256", "typ": "at+jwt", "kid": header["kid"]}
    good = dict(claims, iat=now, nbf=now, exp=now + 300, jti=str(uuid.uuid4()))
    assert await gateway_status(channel, forge(mesh, good_header, good)) == grpc.StatusCode.OK

    unauth = grpc.StatusCode.UNAUTHENTICATED
    forged = {
        "expired": forge(
            mesh, good_header, dict(good, iat=now - 900, nbf=now - 900, exp=now - 300)
        ),
        "not yet valid": forge(mesh, good_header, dict(good, nbf=now + 600, exp=now + 900)),
        "wrong aud": forge(mesh, good_header, dict(good, aud="someone-else")),
        "iss merely contains": forge(mesh, good_header, dict(good, iss=f"evil-{claims['iss']}-x")),
        "unknown kid": forge(mesh, dict(good_header, kid="soma-jwt-v999"), good),
        "unknown crit": forge(mesh, dict(good_header, crit=["exp-2"], **{"exp-2": 1}), good),
        "wrong typ": forge(mesh, dict(good_header, typ="JWT"), good),
    }
    head, payload, signature = token.split(".")
    tampered_claims = dict(claims, tenant="other")
    forged["tampered payload"] = f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{signature}"
    forged["alg none"] = f"{_b64(json.dumps({'alg': 'none', 'typ': 'at+jwt'}).encode())}.{payload}."
    pem = public.public_bytes(  # type: ignore[union-attr]
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    hs_signing_input = f"{_b64(json.dumps(dict(good_header, alg='HS256')).encode())}.{payload}"
    hs_sig = _b64(hmac.new(pem, hs_signing_input.encode(), hashlib.sha256).digest())
    forged["HS256 with the public key"] = f"{hs_signing_input}.{hs_sig}"
    for what, bad in forged.items():
        assert await gateway_status(channel, bad) == unauth, what
        resp = http_request(
            mesh.port, "GET", "/v1/sessions", headers={"authorization": f"Bearer {bad}"}
        )
        assert resp.status == 401, what
        assert bad not in resp.body.decode(), what
