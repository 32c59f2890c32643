"""Audit events: building, redaction, call metadata, subjects, settings."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from services.common.audit import event as ev
from services.common.audit.settings import AuditConfig, load_audit_config
from services.common.auth.principal import Principal
from services.common.config import ConfigError
from soma.audit.v1 import resources_pb2 as pb
from soma.keys.v1 import keys_pb2
from soma.keys.v1 import resources_pb2 as keys

SECRET = "soma_dev_abcdefghijklmnopqrstuvwxyz0123456789"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJrZXk6YWJjIn0.c2lnbmF0dXJl"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"

ALICE = Principal(
    subject="key:abc123",
    tenant="acme",
    roles=frozenset({"member", "admin"}),
    scopes=frozenset({"*"}),
    credential="jwt",
    key_id="abc123",
    token_kid="soma-jwt-v1",
)


def test_build_event_fills_every_field_but_the_chain() -> None:
    call = ev.CallInfo("10.0.0.1", "curl/8", "req-1", TRACE)
    event = ev.build_event(
        method="/soma.keys.v1.KeysService/CreateApiKey",
        principal=ALICE,
        allow=True,
        reason="admin may create keys",
        status_code=grpc.StatusCode.OK,
        call=call,
        resource="keys/k1",
        detail={"api_key.display_name": "ci"},
    )
    assert event.name.startswith("auditEvents/") and len(ev.event_id(event)) == 36
    assert event.tenant == "acme"
    assert event.actor == pb.AuditActor(
        subject="key:abc123",
        tenant="acme",
        key_id="abc123",
        token_kid="soma-jwt-v1",
        roles=["admin", "member"],
    )
    assert (event.client_address, event.user_agent) == ("10.0.0.1", "curl/8")
    assert (event.request_id, event.trace_id) == ("req-1", TRACE)
    assert event.decision == pb.AUDIT_DECISION_ALLOW
    assert event.status_code == 0 and event.resource == "keys/k1"
    assert event.HasField("event_time") and not event.HasField("ingest_time")
    assert (event.sequence, event.previous_hash, event.hash) == (0, "", "")
    assert ev.decode(ev.encode(event)) == event

    denied = ev.build_event(
        method="/soma.keys.v1.KeysService/CreateTenant",
        principal=None,
        allow=False,
        reason="x",
        status_code=grpc.StatusCode.PERMISSION_DENIED,
        call=ev.CallInfo(),
    )
    assert denied.decision == pb.AUDIT_DECISION_DENY and denied.status_code == 7
    assert denied.tenant == "" and denied.actor == pb.AuditActor()
    assert ev.event_id(denied) != ev.event_id(event)


def test_subject_per_tenant_and_service() -> None:
    event = pb.AuditEvent(tenant="acme", method="/soma.keys.v1.KeysService/CreateApiKey")
    assert ev.subject_for(event) == "audit.acme.keys"
    assert ev.subject_for(pb.AuditEvent(method="/x.Y/Z")) == "audit._.x_Y"
    hostile = pb.AuditEvent(tenant="a.b*>c d", method="/soma.gateway.v1.GatewayService/Get")
    assert ev.subject_for(hostile) == "audit.a_b__c_d.gateway"


@pytest.mark.parametrize(
    ("name", "value", "kept"),
    [
        ("display_name", "ci runner", True),
        ("key_id", "abc123", True),
        ("api_key.key_id", "abc123", True),
        ("token_kid", "soma-jwt-v1", True),
        ("api_key", "anything", False),
        ("secret", "x", False),
        ("page_token", "opaque", False),
        ("password", "hunter2", False),
        ("pepper", "p", False),
        ("client_secret", "s", False),
        ("note", SECRET, False),
        ("note", f"here: {JWT}", False),
        ("note", "Bearer abc.def", False),
        ("note", "-----BEGIN PRIVATE KEY-----\nMII", False),
    ],
)
def test_redaction(name: str, value: str, kept: bool) -> None:
    out = ev.redact_detail({name: value})
    assert out[name] == (value if kept else ev.REDACTED)


def test_detail_is_small() -> None:
    out = ev.redact_detail({f"f{i}": "v" * 500 for i in range(40)})
    assert len(out) == ev.MAX_DETAIL_ENTRIES
    assert all(len(v) <= ev.MAX_VALUE_CHARS for v in out.values())
    assert ev.redact_detail({"n": 3, "b": True, "l": ["a", "b"], "x": b"12"}) == {
        "n": "3",
        "b": "true",
        "l": "a,b",
        "x": "<2 bytes>",
    }


def test_request_detail_walks_one_level_and_redacts() -> None:
    create = keys_pb2.CreateApiKeyRequest(
        api_key=keys.ApiKey(display_name="ci", roles=["admin"], scopes=["*"]), request_id="r1"
    )
    assert ev.request_detail(create) == {
        "api_key.display_name": "ci",
        "api_key.scopes": "*",
        "api_key.roles": "admin",
        "request_id": "r1",
    }
    issue = keys_pb2.IssueTokenRequest(api_key=SECRET, audience="a", scopes=["x", "y"])
    detail = ev.request_detail(issue)
    assert detail == {"api_key": ev.REDACTED, "audience": "a", "scopes": "x,y"}
    update = keys_pb2.UpdateApiKeyRequest(
        api_key=keys.ApiKey(name="keys/k1", display_name=SECRET),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "roles"]),
    )
    detail = ev.request_detail(update)
    assert detail["update_mask"] == "display_name,roles"
    assert detail["api_key.display_name"] == ev.REDACTED
    assert SECRET not in str(detail)
    assert ev.request_detail(object()) == {}


def test_resource_and_tenant() -> None:
    create = keys_pb2.CreateApiKeyRequest(api_key=keys.ApiKey(display_name="x"))
    response = keys_pb2.CreateApiKeyResponse(
        api_key=keys.ApiKey(name="keys/k9", tenant="globex"), secret=SECRET
    )
    assert ev.resource_of(create, response) == "keys/k9"
    assert ev.resource_of(create) == ""
    assert ev.resource_of(keys_pb2.RevokeApiKeyRequest(name="keys/k1")) == "keys/k1"
    update = keys_pb2.UpdateApiKeyRequest(api_key=keys.ApiKey(name="keys/k2"))
    assert ev.resource_of(update) == "keys/k2"
    assert ev.tenant_of("keys/k9", response, ALICE) == "globex"
    assert ev.tenant_of("tenants/initech", None, ALICE) == "initech"
    assert ev.tenant_of("keys/k1", None, ALICE) == "acme"
    assert ev.tenant_of("", None, None) == ""


def test_call_info() -> None:
    metadata = [
        ("user-agent", "grpc-python/1.70"),
        ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),
        ("x-request-id", "rid"),
        ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
        ("authorization", f"Bearer {SECRET}"),
        ("blob-bin", b"\x00"),
    ]
    info = ev.call_info(metadata, "ipv4:127.0.0.1:5555")
    assert info == ev.CallInfo("203.0.113.9", "grpc-python/1.70", "rid", TRACE)
    assert ev.call_info([], "ipv4:127.0.0.1:5555", "r2") == ev.CallInfo(
        "127.0.0.1:5555", "", "r2", ""
    )
    assert ev.peer_address("ipv6:[::1]:40000") == "[::1]:40000"
    assert ev.peer_address(None) == ""


@pytest.mark.parametrize(
    ("header", "trace"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-00", TRACE),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", ""),
        ("00-xyz-00f067aa0ba902b7-01", ""),
        ("garbage", ""),
        (None, ""),
    ],
)
def test_trace_id(header: str | None, trace: str) -> None:
    assert ev.trace_id_from(header) == trace


def test_settings(tmp_path: Path) -> None:
    assert load_audit_config({}) == AuditConfig(outbox_dir=Path(".soma/audit-outbox"))
    config = load_audit_config(
        {
            "SOMA_DATA_DIR": str(tmp_path),
            "SOMA_AUDIT_FAIL_CLOSED": "off",
            "SOMA_AUDIT_PUBLISH_TIMEOUT_MS": "250",
            "SOMA_AUDIT_READ_SAMPLE": "0.1",
        }
    )
    assert config == AuditConfig(True, False, 0.25, 0.1, tmp_path / "audit-outbox")
    assert load_audit_config({"SOMA_AUDIT": "off"}).enabled is False
    assert load_audit_config({"SOMA_AUDIT_FAIL_CLOSED": "mutations"}).fail_closed is True
    assert load_audit_config({"SOMA_AUDIT_OUTBOX_DIR": "/x"}).outbox_dir == Path("/x")
    for env in (
        {"SOMA_AUDIT_FAIL_CLOSED": "maybe"},
        {"SOMA_AUDIT_PUBLISH_TIMEOUT_MS": "0"},
        {"SOMA_AUDIT_PUBLISH_TIMEOUT_MS": "soon"},
        {"SOMA_AUDIT_READ_SAMPLE": "2"},
        {"SOMA_AUDIT_READ_SAMPLE": "x"},
    ):
        with pytest.raises(ConfigError):
            load_audit_config(env)
