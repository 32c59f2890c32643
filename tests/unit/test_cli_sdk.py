"""The SDK and the `soma` CLI against a real grpc.aio server on port 0 (a fake KeysService):
credentials on every call, default deadlines, retries of reads only, error output."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from services.client import ApiError, RetryPolicy, SomaClient, redact
from services.client.cli import build_parser, run
from services.common import apikeys
from soma.keys.v1 import keys_pb2, keys_pb2_grpc, resources_pb2
from tests.unit.local_server import serving

SECRET = apikeys.generate("dev")
CALLER_KEY = apikeys.generate("dev").secret


@dataclass
class FakeKeys(keys_pb2_grpc.KeysServiceServicer):
    seen: list[tuple[str, dict[str, str], float | None]] = field(default_factory=list)
    unavailable: dict[str, int] = field(default_factory=dict)  # method -> failures left
    echo_secret_in_errors: bool = False

    async def _enter(self, method: str, context: Any) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.seen.append((method, metadata, context.time_remaining()))
        if self.unavailable.get(method, 0) > 0:
            self.unavailable[method] -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica draining")

    def _key(self) -> resources_pb2.ApiKey:
        return resources_pb2.ApiKey(
            name=f"keys/{SECRET.key_id}",
            key_id=SECRET.key_id,
            tenant="default",
            display_name="ci",
            roles=["member"],
            state=resources_pb2.API_KEY_STATE_ACTIVE,
        )

    async def CreateApiKey(self, request: Any, context: Any) -> keys_pb2.CreateApiKeyResponse:
        await self._enter("CreateApiKey", context)
        key = self._key()
        key.display_name = request.api_key.display_name
        key.roles[:] = request.api_key.roles
        return keys_pb2.CreateApiKeyResponse(api_key=key, secret=SECRET.secret)

    async def GetApiKey(self, request: Any, context: Any) -> resources_pb2.ApiKey:
        await self._enter("GetApiKey", context)
        if request.name != f"keys/{SECRET.key_id}":
            bearer = dict(context.invocation_metadata()).get("authorization", "")
            detail = f" (caller {bearer})" if self.echo_secret_in_errors else ""
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found{detail}")
        return self._key()

    async def ListApiKeys(self, request: Any, context: Any) -> keys_pb2.ListApiKeysResponse:
        await self._enter("ListApiKeys", context)
        if request.page_token == "":
            return keys_pb2.ListApiKeysResponse(api_keys=[self._key()], next_page_token="p2")
        other = self._key()
        other.key_id = "b" * 16
        return keys_pb2.ListApiKeysResponse(api_keys=[other])

    async def RotateApiKey(self, request: Any, context: Any) -> keys_pb2.RotateApiKeyResponse:
        await self._enter("RotateApiKey", context)
        key = self._key()
        key.previous_secret_expire_time.FromSeconds(1_700_000_000 + request.grace_period.seconds)
        return keys_pb2.RotateApiKeyResponse(api_key=key, secret=SECRET.secret)

    async def RevokeApiKey(self, request: Any, context: Any) -> resources_pb2.ApiKey:
        await self._enter("RevokeApiKey", context)
        key = self._key()
        key.state = resources_pb2.API_KEY_STATE_REVOKED
        return key

    async def IssueToken(self, request: Any, context: Any) -> keys_pb2.IssueTokenResponse:
        await self._enter("IssueToken", context)
        return keys_pb2.IssueTokenResponse(
            access_token="eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJrZXk6eCJ9.c2ln",
            token_type="Bearer",
            expires_in=600,
        )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeKeys, str]]:
    servicer = FakeKeys()
    async with serving(keys_pb2_grpc.add_KeysServiceServicer_to_server, servicer) as target:
        yield servicer, target


async def test_credentials_and_default_deadline_on_every_call(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    async with SomaClient(target, api_key=CALLER_KEY) as soma:
        await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"))
        await soma.keys.GetApiKey(
            keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"), timeout=60
        )
    (_, md1, left1), (_, md2, left2) = servicer.seen
    assert md1["authorization"] == f"Bearer {CALLER_KEY}" == md2["authorization"]
    assert left1 is not None and 8 < left1 <= 10.5  # the 10 s default
    assert left2 is not None and 50 < left2 <= 60.5  # a per-call timeout wins


async def test_token_wins_and_no_credential_sends_none(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    async with SomaClient(target, api_key=CALLER_KEY, token="eyJ.a.b") as soma:
        await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"))
    async with SomaClient(target) as soma:
        await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"))
    assert servicer.seen[0][1]["authorization"] == "Bearer eyJ.a.b"
    assert "authorization" not in servicer.seen[1][1]


async def test_reads_are_retried_on_unavailable(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    servicer.unavailable["GetApiKey"] = 2
    async with SomaClient(
        target, api_key=CALLER_KEY, retry=RetryPolicy(initial_backoff=0.01)
    ) as soma:
        key = await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"))
    assert key.key_id == SECRET.key_id
    assert [m for m, _, _ in servicer.seen] == ["GetApiKey"] * 3


async def test_retries_can_be_turned_off(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    servicer.unavailable["GetApiKey"] = 1
    async with SomaClient(target, retry=RetryPolicy(max_attempts=1)) as soma:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=f"keys/{SECRET.key_id}"))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_writes_are_not_retried(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    servicer.unavailable["CreateApiKey"] = 1
    async with SomaClient(
        target, api_key=CALLER_KEY, retry=RetryPolicy(initial_backoff=0.01)
    ) as soma:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await soma.keys.CreateApiKey(keys_pb2.CreateApiKeyRequest())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [m for m, _, _ in servicer.seen] == ["CreateApiKey"]


async def test_iter_api_keys_follows_pages(fake) -> None:  # type: ignore[no-untyped-def]
    _, target = fake
    async with SomaClient(target) as soma:
        ids = [k.key_id async for k in soma.iter_api_keys()]
    assert ids == [SECRET.key_id, "b" * 16]


async def _cli(target: str, argv: list[str], api_key: str = CALLER_KEY) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["--target", target, *argv])
    code = await run(args, {"SOMA_API_KEY": api_key}, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_cli_create_prints_the_secret_once_with_a_warning(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    code, out, err = await _cli(target, ["keys", "create", "--name", "ci", "--role", "member"])
    assert code == 0 and err == ""
    assert out.count(SECRET.secret) == 1
    assert "Store this secret now" in out
    assert f"Created API key keys/{SECRET.key_id}" in out
    assert servicer.seen[0][1]["authorization"] == f"Bearer {CALLER_KEY}"


async def test_cli_json_output(fake) -> None:  # type: ignore[no-untyped-def]
    import json

    _, target = fake
    code, out, _ = await _cli(target, ["keys", "create", "--json"])
    assert code == 0 and json.loads(out)["secret"] == SECRET.secret
    code, out, _ = await _cli(target, ["--json", "keys", "list"])
    assert [k["key_id"] for k in json.loads(out)["api_keys"]] == [SECRET.key_id, "b" * 16]


async def test_cli_list_get_rotate_revoke_token(fake) -> None:  # type: ignore[no-untyped-def]
    _, target = fake
    code, out, _ = await _cli(target, ["keys", "list"])
    assert code == 0 and out.splitlines()[0].startswith("KEY ID") and len(out.splitlines()) == 3
    code, out, _ = await _cli(target, ["keys", "get", SECRET.key_id])
    assert code == 0 and f"keys/{SECRET.key_id}" in out and SECRET.secret not in out
    code, out, _ = await _cli(target, ["keys", "rotate", SECRET.key_id, "--grace", "1h"])
    assert code == 0 and "previous secret works until" in out and out.count(SECRET.secret) == 1
    code, out, _ = await _cli(target, ["keys", "revoke", SECRET.key_id, "--reason", "x"])
    assert code == 0 and "Revoked" in out and "revoked" in out
    code, out, err = await _cli(target, ["token", "issue", "--ttl", "5m"])
    assert code == 0 and out.strip().startswith("eyJ") and "expires" in err


async def test_cli_error_format_and_no_secret_in_it(fake) -> None:  # type: ignore[no-untyped-def]
    servicer, target = fake
    servicer.echo_secret_in_errors = True  # a misbehaving server echoes the credential
    code, out, err = await _cli(target, ["keys", "get", "nosuchkeyxxxxxxx"])
    assert code == 1 and out == ""
    assert err.startswith("error: NOT_FOUND: keys/nosuchkeyxxxxxxx not found")
    assert CALLER_KEY not in err and "[redacted]" in err


async def test_cli_unreachable_mesh(fake) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await _cli(f"127.0.0.1:{port}", ["--timeout", "2", "keys", "create"])
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")
    assert "is the mesh running" in err and CALLER_KEY not in err


async def test_cli_bad_key_argument_is_a_usage_error(fake) -> None:  # type: ignore[no-untyped-def]
    _, target = fake
    typo = SECRET.secret[:-1] + ("a" if SECRET.secret[-1] != "a" else "b")
    code, _, err = await _cli(target, ["keys", "revoke", typo])
    assert code == 2 and typo not in err and "checksum" in err


def test_redact_hides_keys_jwts_and_held_secrets() -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJrZXk6eCJ9.c2lnbmF0dXJl"
    text = redact(f"bad {SECRET.secret} and {jwt} and hunter2hunter2", ["hunter2hunter2"])
    assert SECRET.secret not in text and jwt not in text and "hunter2" not in text
    assert text.count("[redacted]") == 3


def test_api_error_keeps_code_and_reason() -> None:
    error = ApiError(grpc.StatusCode.PERMISSION_DENIED, "no", "POLICY_DENIED")
    assert str(error) == "PERMISSION_DENIED: no" and error.reason == "POLICY_DENIED"
