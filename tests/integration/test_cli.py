"""`soma` (CLI + SDK) and `soma-mesh admin` against the real mesh, through Envoy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import asyncpg
import grpc
import pytest

from services.client import SomaClient
from services.common import apikeys
from services.mesh import bootstrap
from soma.keys.v1 import keys_pb2
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

KEY_RE = re.compile(apikeys.KEY_PATTERN[1:-1])


def remember(mesh: MeshRunner, secret: str) -> str:
    """Credentials made here must not show up in logs either (test_zzz_no_secrets_in_logs)."""
    record = getattr(mesh, "secrets", None)
    if isinstance(record, set):
        record.add(secret)
    elif isinstance(record, list):
        record.append(secret)
    return secret


def admin_create_key(mesh: MeshRunner, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "services.mesh", "admin", "create-key", "--json",
         "--data-dir", str(mesh.data_dir), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    remember(mesh, data["secret"])
    return data


def soma(mesh: MeshRunner, api_key: str | None, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
    env["SOMA_TARGET"] = mesh.grpc_target
    if api_key:
        env["SOMA_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "services.client.cli", *argv],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def admin_key(mesh: MeshRunner) -> str:
    return str(admin_create_key(mesh)["secret"])


def test_admin_create_key_json(mesh: MeshRunner) -> None:
    data = admin_create_key(mesh, "--tenant", "cli-test", "--role", "member", "--name", "ci")
    assert KEY_RE.fullmatch(data["secret"])
    assert apikeys.parse(data["secret"]).key_id == data["key_id"]
    assert data["name"] == f"keys/{data['key_id']}"
    assert (data["tenant"], data["roles"], data["scopes"]) == ("cli-test", ["member"], ["*"])
    assert data["created_tenant"] is True
    again = admin_create_key(mesh, "--tenant", "cli-test", "--role", "member")
    assert again["created_tenant"] is False and again["key_id"] != data["key_id"]


def test_admin_create_key_refuses_bad_input(mesh: MeshRunner) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.mesh", "admin", "create-key",
         "--data-dir", str(mesh.data_dir), "--role", "root"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "roles must be among" in out.stderr


async def test_bootstrap_made_tenant_default_and_one_admin_key(mesh: MeshRunner) -> None:
    connection = bootstrap.connection_for(mesh.data_dir, dict(os.environ))
    conn = await asyncpg.connect(connection.database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, tenant, roles, scopes, owner FROM auth_api_keys "
            "WHERE display_name = 'bootstrap admin'"
        )
        tenant = await conn.fetchval("SELECT id FROM auth_tenants WHERE id = 'default'")
    finally:
        await conn.close()
    if not rows:
        pytest.skip("the mesh was started with SOMA_MESH_BOOTSTRAP=0")
    [row] = rows
    assert tenant == "default"
    assert (row["tenant"], sorted(row["roles"]), row["scopes"], row["owner"]) == (
        "default", ["admin", "platform_admin"], ["*"], "user:admin"
    )  # fmt: skip
    banner = mesh.log_file.read_text(errors="replace")
    assert banner.count("Admin API key") == 1 and "Store it now" in banner
    printed = [m for m in KEY_RE.finditer(banner) if m[2] == row["id"]]
    assert len(printed) == 1  # the secret was printed, once
    # A second bootstrap on the same database does nothing: a key exists.
    assert await bootstrap.bootstrap(connection) is None


def test_cli_key_lifecycle(mesh: MeshRunner, admin_key: str) -> None:
    created = soma(mesh, admin_key, "keys", "create", "--name", "cli", "--role", "member",
                   "--expires-in", "30d", "--budget", "1000", "--rate-limit", "600")  # fmt: skip
    assert created.returncode == 0, created.stderr
    [secret] = [m[0] for m in KEY_RE.finditer(created.stdout)]
    remember(mesh, secret)
    assert "Store this secret now" in created.stdout
    key_id = apikeys.parse(secret).key_id

    listed = soma(mesh, admin_key, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert key_id in [k["key_id"] for k in json.loads(listed.stdout)["api_keys"]]
    table = soma(mesh, admin_key, "keys", "list")
    assert table.stdout.startswith("KEY ID") and key_id in table.stdout
    assert secret not in listed.stdout + table.stdout

    got = soma(mesh, admin_key, "keys", "get", key_id)
    assert got.returncode == 0 and f"keys/{key_id}" in got.stdout and "member" in got.stdout
    assert secret not in got.stdout

    # The new key works with the CLI itself (a member sees its own keys).
    own = soma(mesh, secret, "keys", "get", key_id)
    assert own.returncode == 0, own.stderr

    rotated = soma(mesh, admin_key, "keys", "rotate", key_id, "--grace", "1h", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = remember(mesh, json.loads(rotated.stdout)["secret"])
    assert new_secret != secret and apikeys.parse(new_secret).key_id == key_id
    assert soma(mesh, secret, "keys", "get", key_id).returncode == 0  # grace period
    assert soma(mesh, new_secret, "keys", "get", key_id).returncode == 0

    revoked = soma(mesh, admin_key, "keys", "revoke", key_id, "--reason", "cli test")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    refused = soma(mesh, new_secret, "keys", "get", key_id)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED: ")
    assert new_secret not in refused.stderr and secret not in refused.stderr


def test_cli_errors_are_one_line_without_secrets(mesh: MeshRunner, admin_key: str) -> None:
    missing = soma(mesh, admin_key, "keys", "get", "a" * 16)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND: ")
    assert admin_key not in missing.stderr
    anonymous = soma(mesh, None, "keys", "list")
    assert anonymous.returncode == 1
    assert anonymous.stderr.startswith("error: UNAUTHENTICATED: ")
    assert "SOMA_API_KEY" in anonymous.stderr  # the hint
    wrong = soma(mesh, apikeys.generate("dev").secret, "keys", "list")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: UNAUTHENTICATED: ")


def test_cli_token_issue(mesh: MeshRunner, admin_key: str) -> None:
    issued = soma(mesh, admin_key, "token", "issue", "--ttl", "5m")
    assert issued.returncode == 0, issued.stderr
    token = remember(mesh, issued.stdout.strip())
    assert token.count(".") == 2 and "expires" in issued.stderr
    listed = soma(mesh, None, "--token", token, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr


async def test_sdk_reads_with_a_key_and_a_token(mesh: MeshRunner, admin_key: str) -> None:
    async with SomaClient(mesh.grpc_target, api_key=admin_key) as client:
        keys = [k async for k in client.iter_api_keys()]
        assert keys and all(k.tenant for k in keys)
        token = await client.issue_token()
        remember(mesh, token.access_token)
    async with SomaClient(mesh.grpc_target, token=token.access_token) as client:
        first = await client.keys.ListApiKeys(keys_pb2.ListApiKeysRequest(page_size=1))
        assert len(first.api_keys) == 1
    async with SomaClient(mesh.grpc_target) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await anonymous.keys.ListApiKeys(keys_pb2.ListApiKeysRequest())
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
