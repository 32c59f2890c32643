"""Audit export formats (services/audit/exporters.py): every record carries its chain hash."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from google.protobuf import json_format
from google.rpc import code_pb2

from services.audit import exporters
from services.common.audit import chain
from soma.audit.v1 import audit_pb2
from soma.audit.v1 import resources_pb2 as pb


def events() -> list[pb.AuditEvent]:
    out = []
    specs = [
        ("/soma.keys.v1.KeysService/CreateApiKey", pb.AUDIT_DECISION_ALLOW, code_pb2.OK),
        ("/soma.keys.v1.KeysService/IssueToken", pb.AUDIT_DECISION_ALLOW, code_pb2.OK),
        ("/soma.gateway.v1.GatewayService/GetSession", pb.AUDIT_DECISION_DENY, 16),
        ("/soma.keys.v1.KeysService/RevokeApiKey", pb.AUDIT_DECISION_DENY, 7),
    ]
    for i, (method, decision, code) in enumerate(specs, start=1):
        event = pb.AuditEvent(
            name=f"auditEvents/00000000-0000-4000-8000-{i:012d}",
            tenant="acme",
            actor=pb.AuditActor(subject="key:k1", tenant="acme", key_id="k1", roles=["admin"]),
            client_address="[::1]:5000" if i == 2 else "10.0.0.7:4242",
            user_agent="curl/8",
            method=method,
            resource="keys/k|2=x\\y",
            decision=decision,
            decision_reason="policy said so\nreally",
            status_code=code,
            request_id=f"r{i}",
            detail={"scopes": "a,b"},
        )
        event.event_time.FromDatetime(datetime(2026, 3, 1, 12, 0, i, tzinfo=UTC))
        out.append(event)
    chain.chain_events(out)
    return out


def test_json_lines_round_trip_and_verify_offline() -> None:
    body = b"".join(exporters.chunks(exporters.json_line, events()))
    lines = body.decode().splitlines()
    assert len(lines) == 4
    parsed = [json_format.Parse(line, pb.AuditEvent()) for line in lines]
    assert parsed == events()
    assert all("hash" in json.loads(line) and "previousHash" in json.loads(line) for line in lines)
    assert chain.verify(parsed) is None
    parsed[1].resource = "keys/other"
    found = chain.verify(parsed)
    assert found is not None and found.sequence == 2


def test_cef_lines_carry_the_chain_and_escape() -> None:
    lines = [exporters.cef_line(e) for e in events()]
    first = lines[0]
    assert first.startswith(
        f"CEF:0|Soma|Soma Mesh|{exporters.VERSION}|/soma.keys.v1.KeysService/CreateApiKey|"
        "ALLOW CreateApiKey|3|"
    )
    assert f"cs6={events()[0].hash}" in first and f"cs5={chain.GENESIS}" in first
    assert "cn1Label=sequence cn1=1" in first
    assert "cs1=keys/k|2\\=x\\\\y" in first  # `=` and `\` escaped in extensions; `|` is fine
    assert "reason=policy said so\\nreally" in first
    assert "src=10.0.0.7 spt=4242" in first
    assert "\n" not in first
    assert lines[2].split("|")[6] == "7"  # a denial is severity 7
    assert "src=::1" in lines[1]


def test_ocsf_api_activity() -> None:
    records = [json.loads(exporters.ocsf_api_activity(e)) for e in events()]
    first = records[0]
    assert first["class_uid"] == 6003 and first["category_uid"] == 6
    assert first["activity_id"] == 1 and first["type_uid"] == 600301
    assert first["api"]["operation"] == "CreateApiKey"
    assert first["api"]["service"]["name"] == "soma.keys.v1.KeysService"
    assert first["actor"]["user"]["uid"] == "key:k1"
    assert first["unmapped"]["hash"] == events()[0].hash
    assert first["unmapped"]["sequence"] == 1
    assert first["status_id"] == 1 and records[3]["status_id"] == 2
    assert records[3]["activity_id"] == 4  # Revoke
    assert records[2]["activity_id"] == 2  # Get
    assert first["time"] == int(datetime(2026, 3, 1, 12, 0, 1, tzinfo=UTC).timestamp() * 1000)


def test_ocsf_authentication_only_authentication_events() -> None:
    rendered = [exporters.ocsf_authentication(e) for e in events()]
    assert rendered[0] is None and rendered[3] is None
    token, denied = json.loads(rendered[1] or ""), json.loads(rendered[2] or "")
    assert token["class_uid"] == 3002 and token["status"] == "Success"
    assert denied["status"] == "Failure" and denied["status_code"] == "UNAUTHENTICATED"
    assert token["unmapped"]["hash"] == events()[1].hash
    assert token["src_endpoint"] == {"ip": "::1", "port": 5000}


def test_formats_registry_and_chunks() -> None:
    assert exporters.FORMATS[audit_pb2.AUDIT_EXPORT_FORMAT_UNSPECIFIED].content_type == (
        "application/x-ndjson"
    )
    assert exporters.FORMATS[audit_pb2.AUDIT_EXPORT_FORMAT_CEF].render is exporters.cef_line
    many = events() * 50
    pieces = list(exporters.chunks(exporters.json_line, many, limit=2000))
    assert len(pieces) > 1
    assert all(p.endswith(b"\n") and len(p) <= 2000 for p in pieces)
    assert b"".join(pieces).count(b"\n") == len(many)
    skipped = list(exporters.chunks(exporters.ocsf_authentication, many))
    assert b"".join(skipped).count(b"\n") == 100
