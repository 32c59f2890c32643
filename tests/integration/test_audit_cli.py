"""`soma audit list|tail|export|verify` against the real mesh, through Envoy.

The tests work in their own tenant (`audit-cli`), so its chain holds only what they did: key
creations by its admin, a member's denied calls, and the auditing reads themselves (reads are
audited too, SOMA_AUDIT_READ_SAMPLE=1.0). Events are stored asynchronously (JetStream → Audit
service), so every expectation on the trail is polled.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.client import SomaClient
from soma.audit.v1 import audit_pb2
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

TENANT = "audit-cli"
OTHER = "audit-cli-other"
CREATE = "/soma.keys.v1.KeysService/CreateApiKey"
T = TypeVar("T")


def soma(mesh: MeshRunner, api_key: str | None, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
    env["SOMA_TARGET"] = mesh.grpc_target
    if api_key:
        env["SOMA_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "services.client.cli", *argv],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def eventually(probe: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.3)


def listed(mesh: MeshRunner, key: str, *argv: str) -> list[dict[str, Any]]:
    out = soma(mesh, key, "audit", "list", "--json", *argv)
    assert out.returncode == 0, out.stderr
    events: list[dict[str, Any]] = json.loads(out.stdout)["audit_events"]
    return events


@pytest.fixture(scope="module")
def admin(mesh: MeshRunner) -> str:
    return mesh.create_key(tenant=TENANT, roles=("admin",))


@pytest.fixture(scope="module")
def member(mesh: MeshRunner) -> str:
    return mesh.create_key(tenant=TENANT, roles=("member",))


@pytest.fixture(scope="module")
def created(mesh: MeshRunner, admin: str) -> list[str]:
    """Three key creations, each with its own request id, seen in the trail."""
    ids = []
    for n in range(3):
        request_id = str(uuid.uuid4())
        out = soma(mesh, admin, "keys", "create", "--name", f"audited-{n}", "--role", "member",
                   "--request-id", request_id)  # fmt: skip
        assert out.returncode == 0, out.stderr
        secret = next(w for w in out.stdout.split() if w.startswith("soma_"))
        mesh.secrets.append(secret)
        ids.append(request_id)
    eventually(
        lambda: (
            True
            if {e.get("request_id") for e in listed(mesh, admin, "--method", CREATE)} >= set(ids)
            else None
        ),
        what="the three CreateApiKey events",
    )
    return ids


def test_list_shows_each_mutation_once_with_its_outcome(
    mesh: MeshRunner, admin: str, created: list[str]
) -> None:
    events = listed(mesh, admin, "--method", CREATE, "--order", "oldest", "--limit", "0")
    mine = [e for e in events if e.get("request_id") in created]
    assert sorted(e["request_id"] for e in mine) == sorted(created)  # exactly one each
    for event in mine:
        assert event["tenant"] == TENANT and event["decision"] == "AUDIT_DECISION_ALLOW"
        assert event.get("status_code", "OK") == "OK"
        assert event["resource"].startswith("keys/")
        assert event["actor"]["key_id"] and "soma_" not in json.dumps(event)
        assert int(event["sequence"]) >= 1 and len(event["hash"]) == 64
    table = soma(mesh, admin, "audit", "list", "--method", CREATE, "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "SEQ", "TENANT"] and len(lines) == 3
    assert "KeysService/CreateApiKey" in lines[1] and "allow" in lines[1]


def test_denials_are_listed(mesh: MeshRunner, admin: str, member: str) -> None:
    refused = soma(mesh, member, "audit", "list")  # auditors and admins only
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    events = eventually(
        lambda: (
            [
                e
                for e in listed(mesh, admin, "--decision", "deny", "--since", "10m")
                if e["method"].endswith("/ListAuditEvents")
            ]
            or None
        ),
        what="the member's denied ListAuditEvents",
    )
    assert events[0]["status_code"] == "PERMISSION_DENIED"
    assert events[0]["decision_reason"]


def test_tail_replays_from_a_sequence(mesh: MeshRunner, admin: str, created: list[str]) -> None:
    out = soma(mesh, admin, "audit", "tail", "--after-sequence", "0", "--limit", "3", "--json")
    assert out.returncode == 0, out.stderr
    sequences = [int(json.loads(line)["sequence"]) for line in out.stdout.splitlines()]
    assert sequences == [1, 2, 3]
    plain = soma(mesh, admin, "audit", "tail", "--after-sequence", "1", "--limit", "1")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("\n") == 1 and f" #2 {TENANT} " in plain.stdout


def test_export_verifies_offline_and_matches_the_server(
    mesh: MeshRunner, admin: str, created: list[str], tmp_path: Path
) -> None:
    out = soma(mesh, admin, "audit", "export", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    assert "exported" in out.stderr and "jsonl" in out.stderr  # progress on stderr only
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records and all(r["tenant"] == TENANT for r in records)
    assert [int(r["sequence"]) for r in records] == list(range(1, len(records) + 1))
    path = tmp_path / "audit.jsonl"
    path.write_text(out.stdout, encoding="utf-8")

    verified = soma(mesh, None, "audit", "verify", str(path))  # offline: no credential
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"OK: {len(records)} events in 1 chain verified")
    head = records[-1]["hash"]
    assert f"head {head}" in verified.stdout

    server = _verify_on_server(mesh, admin, int(records[-1]["sequence"]))
    assert server.ok and server.head_hash == head
    assert server.events_verified == len(records)

    lines = out.stdout.splitlines(keepends=True)
    tampered = json.loads(lines[0])
    tampered["resource"] = "keys/forged"
    lines[0] = json.dumps(tampered) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    broken = soma(mesh, None, "audit", "verify", str(path))
    assert broken.returncode == 1
    assert "sequence 1" in broken.stdout and "HASH_MISMATCH" in broken.stdout


def _verify_on_server(
    mesh: MeshRunner, key: str, end_sequence: int
) -> audit_pb2.VerifyAuditChainResponse:
    async def call() -> audit_pb2.VerifyAuditChainResponse:
        async with SomaClient(mesh.grpc_target, api_key=key) as client:
            return await client.audit.VerifyAuditChain(
                audit_pb2.VerifyAuditChainRequest(end_sequence=end_sequence)
            )

    return asyncio.run(call())


def test_cef_and_ocsf_exports_carry_the_chain_hash(
    mesh: MeshRunner, admin: str, created: list[str]
) -> None:
    jsonl = soma(mesh, admin, "audit", "export")
    assert jsonl.returncode == 0, jsonl.stderr
    hashes = [json.loads(line)["hash"] for line in jsonl.stdout.splitlines()]
    cef = soma(mesh, admin, "audit", "export", "--format", "cef")
    assert cef.returncode == 0, cef.stderr
    cef_lines = cef.stdout.splitlines()
    assert cef_lines and all(line.startswith("CEF:0|Soma|Soma Mesh|") for line in cef_lines)
    assert all(h in cef.stdout for h in hashes)  # later exports hold at least the earlier events
    ocsf = soma(mesh, admin, "audit", "export", "--format", "ocsf-api")
    assert ocsf.returncode == 0, ocsf.stderr
    records = [json.loads(line) for line in ocsf.stdout.splitlines()]
    assert records and {r["class_uid"] for r in records} == {6003}
    assert all(h in ocsf.stdout for h in hashes)


def test_a_tenant_cannot_read_another_tenants_trail(
    mesh: MeshRunner, admin: str, created: list[str]
) -> None:
    other = mesh.create_key(tenant=OTHER, roles=("admin",))
    for verb in (["list"], ["tail", "--limit", "1"], ["export"]):
        out = soma(mesh, other, "audit", *verb, "--tenant", TENANT)
        assert out.returncode == 1, (verb, out.stdout)
        assert "NOT_FOUND" in out.stderr or "PERMISSION_DENIED" in out.stderr
    own = listed(mesh, other, "--limit", "0")
    assert all(e["tenant"] == OTHER for e in own)
    assert not {e.get("request_id") for e in own} & set(created)
