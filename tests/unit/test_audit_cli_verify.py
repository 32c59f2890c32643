"""`soma audit verify FILE`: offline verification of crafted JSON Lines exports.

The exports are built the way the Audit service chains (services/common/audit/chain.py) and
written the way ExportAuditEvents writes JSON Lines (proto3 JSON, one event per line); then one
line is tampered with, deleted, reordered, repeated... and the first broken link is named.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format

from services.client import audit_verify
from services.client.cli import main
from services.common.audit import chain
from soma.audit.v1 import resources_pb2

T0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
CHAIN_FIELDS = ("sequence", "previous_hash", "hash", "ingest_time")


def documented_link(previous_hash: str, event: resources_pb2.AuditEvent) -> str:
    """The chain link exactly as docs/audit.md spells it, independent of chain.py."""
    data = json_format.MessageToDict(event, preserving_proto_field_name=True)
    for name in CHAIN_FIELDS:
        data.pop(name, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(previous_hash.encode() + canonical.encode("utf-8")).hexdigest()


def chained(tenant: str, count: int, start: int = 1, previous: str = "0" * 64) -> list[str]:
    """`count` events of `tenant` from sequence `start`, as export lines."""
    lines = []
    for seq in range(start, start + count):
        event = resources_pb2.AuditEvent(
            name=f"auditEvents/00000000-0000-4000-8000-{seq:012d}",
            tenant=tenant,
            actor=resources_pb2.AuditActor(subject="user:alice", key_id="k1", roles=["admin"]),
            client_address="10.0.0.5:51000",
            user_agent="grpc-python/1.70 é",  # non-ASCII: ensure_ascii=False matters
            method="/soma.keys.v1.KeysService/CreateApiKey",
            resource=f"keys/k{seq}",
            decision=resources_pb2.AUDIT_DECISION_ALLOW,
            decision_reason="role admin",
            request_id=f"req-{seq}",
            detail={"api_key.display_name": "ci", "sampled": "false"},
            sequence=seq,
            previous_hash=previous,
        )
        event.event_time.FromDatetime(T0 + timedelta(seconds=seq))
        event.ingest_time.FromDatetime(T0 + timedelta(seconds=seq, milliseconds=5))
        event.hash = chain.link(previous, event)
        previous = event.hash
        lines.append(json_format.MessageToJson(event, indent=None) + "\n")  # proto3 JSON form
    return lines


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def verify(lines: list[str]) -> audit_verify.Result:
    return audit_verify.verify_lines(lines, "audit.jsonl")


def test_chain_py_links_exactly_as_documented() -> None:
    [line] = chained("acme", 1)
    event = json_format.Parse(line, resources_pb2.AuditEvent())
    assert event.hash == documented_link("0" * 64, event)
    # The chain fields are not part of the canonical bytes.
    other = resources_pb2.AuditEvent()
    other.CopyFrom(event)
    other.sequence, other.hash = 99, "f" * 64
    other.ingest_time.FromDatetime(T0)
    assert chain.link("0" * 64, other) == event.hash


def test_intact_export_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = chained("acme", 25)
    result = verify(lines)
    assert result.ok and result.events == 25 and result.first_break is None
    summary = result.chains["acme"]
    assert (summary.first_sequence, summary.last_sequence) == (1, 25)
    assert summary.head == json.loads(lines[-1])["hash"] and summary.from_start

    assert main(["audit", "verify", str(write(tmp_path, lines))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 25 events in 1 chain verified")
    assert "sequences 1..25" in out and "start of chain" in out


def test_tampered_line_is_a_hash_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = chained("acme", 10)
    record = json.loads(lines[4])
    record["actor"]["subject"] = "user:mallory"  # sequence 5 rewritten
    lines[4] = json.dumps(record) + "\n"
    result = verify(lines)
    assert not result.ok and result.first_break is not None
    assert result.first_break.reason == "HASH_MISMATCH"
    assert (result.first_break.sequence, result.first_break.line) == (5, 5)
    assert result.first_break.actual == record["hash"]
    assert result.chains["acme"].last_sequence == 4  # verified up to the break

    assert main(["audit", "verify", str(write(tmp_path, lines))]) == 1
    out = capsys.readouterr().out
    assert out.startswith("BROKEN: tenant 'acme', sequence 5, line 5: HASH_MISMATCH")
    assert "event 5 was altered" in out


def test_tampered_line_with_a_recomputed_hash_breaks_the_next_link() -> None:
    lines = chained("acme", 6)
    event = json_format.Parse(lines[2], resources_pb2.AuditEvent())
    event.status_code = 7
    event.hash = chain.link(event.previous_hash, event)  # a careful forger
    lines[2] = json_format.MessageToJson(event, indent=None) + "\n"
    broken = verify(lines).first_break
    assert broken is not None
    assert (broken.reason, broken.sequence) == ("PREVIOUS_HASH_MISMATCH", 4)
    assert broken.actual != broken.expected == event.hash


def test_deleted_line_is_a_missing_event(tmp_path: Path) -> None:
    lines = chained("acme", 10)
    del lines[6]  # sequence 7
    result = verify(lines)
    assert result.first_break is not None
    # Named by the missing sequence, found at the line of the event after the gap.
    assert (result.first_break.reason, result.first_break.sequence) == ("MISSING_EVENT", 7)
    assert result.first_break.line == 7 and result.first_break.event == ""
    assert "event 7 is missing" in result.first_break.message
    assert main(["audit", "verify", str(write(tmp_path, lines))]) == 1


def test_deleted_last_line_still_verifies_but_the_head_tells() -> None:
    lines = chained("acme", 5)
    result = verify(lines[:-1])
    assert result.ok and result.chains["acme"].head == json.loads(lines[-2])["hash"]


def test_reordered_line_is_out_of_order() -> None:
    lines = chained("acme", 8)
    lines[2], lines[3] = lines[3], lines[2]  # sequences 3 and 4 swapped
    broken = verify(lines).first_break
    assert broken is not None
    assert (broken.reason, broken.sequence, broken.line) == ("OUT_OF_ORDER", 4, 3)
    assert "reordered" in broken.message


def test_repeated_line_is_out_of_order() -> None:
    lines = chained("acme", 4)
    lines.insert(2, lines[1])
    broken = verify(lines).first_break
    assert broken is not None and (broken.reason, broken.line) == ("OUT_OF_ORDER", 3)


def test_first_event_must_start_from_zeros() -> None:
    lines = chained("acme", 3, previous="1" * 64)
    broken = verify(lines).first_break
    assert broken is not None and (broken.reason, broken.sequence) == ("PREVIOUS_HASH_MISMATCH", 1)


def test_export_starting_mid_chain_is_anchored_at_its_first_previous_hash() -> None:
    head = json.loads(chained("acme", 40)[-1])["hash"]
    result = verify(chained("acme", 10, start=41, previous=head))
    assert result.ok
    summary = result.chains["acme"]
    assert (summary.first_sequence, summary.anchor) == (41, head)
    assert f"previous_hash {head}" in result.describe()


def test_each_tenant_chain_verifies_on_its_own() -> None:
    a, b = chained("acme", 3), chained("globex", 4)
    mixed = [a[0], b[0], b[1], a[1], b[2], a[2], b[3]]
    result = verify(mixed)
    assert result.ok and result.events == 7 and set(result.chains) == {"acme", "globex"}
    mixed[4] = mixed[4].replace("req-3", "req-X")  # globex sequence 3
    broken = verify(mixed).first_break
    assert broken is not None and (broken.tenant, broken.sequence) == ("globex", 3)


def test_blank_lines_and_original_field_names_are_accepted() -> None:
    lines = chained("acme", 3)
    snake = [
        json.dumps(json_format.MessageToDict(
            json_format.Parse(line, resources_pb2.AuditEvent()), preserving_proto_field_name=True
        )) + "\n"
        for line in lines
    ]  # fmt: skip
    assert verify(["\n", *snake, "   \n"]).ok


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("CEF:0|Soma|Soma Mesh|1|x|y|3|", "CEF record"),
        ('{"class_uid": 6003, "unmapped": {}}', "OCSF record"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"nonsense": 1}', "not an AuditEvent"),
        ('{"name": "auditEvents/x", "tenant": "acme"}', "no `sequence`/`hash`"),
    ],
)
def test_other_input_is_refused_with_a_reason(line: str, needle: str) -> None:
    result = verify([*chained("acme", 1), line + "\n"])
    assert not result.ok and result.first_break is not None
    assert (result.first_break.reason, result.first_break.line) == ("MALFORMED", 2)
    assert needle in result.first_break.message


def test_empty_file_is_not_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(write(tmp_path, []))]) == 1
    assert "EMPTY" in capsys.readouterr().out


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = chained("acme", 3)
    del lines[1]
    assert main(["audit", "verify", "--json", str(write(tmp_path, lines))]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["events_verified"] == 1
    assert data["first_break"]["reason"] == "MISSING_EVENT"
    assert data["chains"][0]["head_hash"] == json.loads(lines[0])["hash"]


def test_verify_needs_no_mesh_and_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOMA_TARGET", "127.0.0.1:1")  # nothing listens there
    monkeypatch.delenv("SOMA_API_KEY", raising=False)
    assert main(["audit", "verify", str(write(tmp_path, chained("acme", 2)))]) == 0
