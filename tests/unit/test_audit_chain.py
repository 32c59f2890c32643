"""The audit hash chain (services/common/audit/chain.py) and the Audit service's row mapping."""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.audit import rows
from services.common.audit import chain
from soma.audit.v1 import resources_pb2 as pb


def sample(i: int = 1, tenant: str = "acme") -> pb.AuditEvent:
    event = pb.AuditEvent(
        name=f"auditEvents/00000000-0000-4000-8000-{i:012d}",
        tenant=tenant,
        actor=pb.AuditActor(
            subject="key:k1", tenant=tenant, key_id="k1", roles=["admin", "auditor"]
        ),
        client_address="127.0.0.1:5000",
        user_agent="grpc-python/1.70",
        method="/soma.keys.v1.KeysService/CreateApiKey",
        resource="keys/k2",
        decision=pb.AUDIT_DECISION_ALLOW,
        decision_reason="role admin may call CreateApiKey",
        status_code=0,
        request_id="r1",
        trace_id="0" * 31 + "1",
        detail={"api_key.display_name": "ci", "scopes": "keys:read"},
    )
    event.event_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    return event


GOLDEN = (
    b'{"actor":{"key_id":"k1","roles":["admin","auditor"],"subject":"key:k1","tenant":"acme"},'
    b'"client_address":"127.0.0.1:5000","decision":"AUDIT_DECISION_ALLOW",'
    b'"decision_reason":"role admin may call CreateApiKey",'
    b'"detail":{"api_key.display_name":"ci","scopes":"keys:read"},'
    b'"event_time":"2026-01-02T03:04:05.678901Z","method":"/soma.keys.v1.KeysService/CreateApiKey",'
    b'"name":"auditEvents/00000000-0000-4000-8000-000000000001","request_id":"r1",'
    b'"resource":"keys/k2","tenant":"acme","trace_id":"00000000000000000000000000000001",'
    b'"user_agent":"grpc-python/1.70"}'
)


def test_canonical_bytes_are_the_documented_form() -> None:
    assert chain.canonical_bytes(sample()) == GOLDEN
    assert chain.generic_canonical_bytes(sample()) == GOLDEN


def test_hash_is_sha256_of_previous_hash_and_canonical_bytes() -> None:
    expected = hashlib.sha256(chain.GENESIS.encode() + GOLDEN).hexdigest()
    assert chain.link(chain.GENESIS, sample()) == expected
    # Pinned: a change here breaks every stored chain and every export.
    assert expected == hashlib.sha256(b"0" * 64 + GOLDEN).hexdigest()


def test_chain_fields_are_not_hashed() -> None:
    plain = sample()
    chained = sample()
    chained.sequence = 7
    chained.previous_hash = "a" * 64
    chained.hash = "b" * 64
    chained.ingest_time.FromDatetime(datetime.now(UTC))
    assert chain.canonical_bytes(plain) == chain.canonical_bytes(chained)


def test_every_field_is_hashed() -> None:
    base = chain.canonical_bytes(sample())
    for change in (
        lambda e: setattr(e, "resource", "keys/other"),
        lambda e: setattr(e.actor, "subject", "key:k9"),
        lambda e: e.actor.roles.append("member"),
        lambda e: setattr(e, "status_code", 7),
        lambda e: setattr(e, "decision", pb.AUDIT_DECISION_DENY),
        lambda e: e.detail.__setitem__("scopes", "*"),
        lambda e: setattr(e.event_time, "nanos", e.event_time.nanos + 1000),
    ):
        event = sample()
        change(event)
        assert chain.canonical_bytes(event) != base


def _text(rng: random.Random) -> str:
    alphabet = string.printable + 'éü日本\u2028"\\/'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def random_event(rng: random.Random) -> pb.AuditEvent:
    event = pb.AuditEvent()
    for name in ("name", "tenant", "client_address", "user_agent", "method", "resource"):
        if rng.random() < 0.8:
            setattr(event, name, _text(rng))
    for name in ("decision_reason", "request_id", "trace_id"):
        if rng.random() < 0.5:
            setattr(event, name, _text(rng))
    if rng.random() < 0.8:
        event.event_time.seconds = rng.randrange(-(10**10), 10**10)
        event.event_time.nanos = rng.choice(
            [0, rng.randrange(10**9), rng.randrange(1000) * 10**6, rng.randrange(10**6) * 1000]
        )
    if rng.random() < 0.8:
        event.actor.SetInParent()
        for name in ("subject", "tenant", "key_id", "token_kid"):
            if rng.random() < 0.6:
                setattr(event.actor, name, _text(rng))
        event.actor.roles.extend(_text(rng) for _ in range(rng.randrange(3)))
    event.decision = rng.choice([0, 1, 2, 9])  # 9: a number the enum does not name
    event.status_code = rng.choice([0, 3, 7, 16, 99])
    for _ in range(rng.randrange(4)):
        event.detail[_text(rng)] = _text(rng)
    if rng.random() < 0.3:
        event.sequence = rng.randrange(1, 1000)
        event.hash = "f" * 64
    return event


def test_fast_path_matches_message_to_dict_on_random_events() -> None:
    assert chain._FAST
    rng = random.Random(4)
    for _ in range(3000):
        event = random_event(rng)
        assert chain._fast_bytes(event) == chain.generic_canonical_bytes(event), event
        assert chain._fast_dict(event) == chain.canonical_dict(event)


def test_timestamp_text_matches_protobuf() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        stamp = Timestamp(
            seconds=rng.randrange(-(10**10), 2 * 10**10),
            nanos=rng.choice([0, rng.randrange(10**9), rng.randrange(10**6) * 1000]),
        )
        assert chain._timestamp_text(stamp.seconds, stamp.nanos) == f'"{stamp.ToJsonString()}"'


def chained(n: int, start: int = 0, previous: str = chain.GENESIS) -> list[pb.AuditEvent]:
    events = [sample(i) for i in range(start + 1, start + n + 1)]
    chain.chain_events(events, after_sequence=start, previous_hash=previous)
    return events


def test_a_chain_verifies() -> None:
    events = chained(10)
    assert [e.sequence for e in events] == list(range(1, 11))
    assert events[0].previous_hash == chain.GENESIS
    assert all(b.previous_hash == a.hash for a, b in itertools.pairwise(events))
    assert chain.verify(events) is None
    verifier = chain.ChainVerifier()
    assert all(verifier.check(e) is None for e in events)
    assert verifier.count == 10 and verifier.head_hash == events[-1].hash


def test_an_altered_event_is_a_hash_mismatch() -> None:
    events = chained(10)
    events[4].resource = "keys/forged"
    found = chain.verify(events)
    assert found is not None
    assert (found.sequence, found.reason_name) == (5, "HASH_MISMATCH")
    assert found.event == events[4].name and found.actual_hash == events[4].hash
    assert "altered" in found.message


def test_a_deleted_event_is_missing() -> None:
    events = chained(10)
    del events[6]
    found = chain.verify(events)
    assert found is not None
    assert (found.sequence, found.reason_name, found.event) == (7, "MISSING_EVENT", "")


def test_a_rehashed_event_breaks_the_next_link() -> None:
    events = chained(10)
    events[2].resource = "keys/forged"
    events[2].hash = chain.link(events[2].previous_hash, events[2])  # covers its tracks...
    found = chain.verify(events)
    assert found is not None  # ...but event 4 still points at the original
    assert (found.sequence, found.reason_name) == (4, "PREVIOUS_HASH_MISMATCH")
    assert found.expected_hash == events[2].hash


def test_verification_from_a_checkpoint() -> None:
    events = chained(10)
    retained = events[4:]
    anchor = events[3]
    assert (
        chain.verify(retained, anchor_sequence=4, anchor_hash=anchor.hash, checkpoint=True) is None
    )
    found = chain.verify(retained, anchor_sequence=4, anchor_hash="e" * 64, checkpoint=True)
    assert found is not None
    assert (found.sequence, found.reason_name) == (5, "CHECKPOINT_MISMATCH")
    out_of_order = chain.verify([events[1], events[0]])
    assert out_of_order is not None and out_of_order.reason_name == "MISSING_EVENT"


def test_break_to_proto() -> None:
    events = chained(3)
    events[1].method = "x"
    found = chain.verify(events)
    assert found is not None
    message = found.to_proto()
    assert message.sequence == 2 and message.reason == chain.HASH_MISMATCH


# -- rows --------------------------------------------------------------------------------------


def test_prepare_normalizes_and_keeps_the_canonical_form() -> None:
    event = sample()
    event.tenant = ""
    event.sequence = 3  # an emitter must not set chain fields; they are dropped
    item = rows.prepare(event.SerializeToString(), "", datetime.now(UTC))
    assert item.event.tenant == "_" and item.event.sequence == 0
    assert item.canonical == chain.canonical_bytes(item.event)
    assert item.event_id == "00000000-0000-4000-8000-000000000001"
    nameless = pb.AuditEvent(tenant="acme")
    item = rows.prepare(nameless.SerializeToString(), "abc", datetime.now(UTC))
    assert item.event.name == "auditEvents/abc" and item.event.HasField("event_time")
    with pytest.raises(ValueError):
        rows.prepare(b"\xff\xff", "x", datetime.now(UTC))
    with pytest.raises(ValueError):
        rows.prepare(pb.AuditEvent(tenant="a").SerializeToString(), "", datetime.now(UTC))


def test_rows_round_trip_and_column_drift() -> None:
    item = rows.prepare(sample().SerializeToString(), "", datetime.now(UTC))
    now = datetime.now(UTC)
    record = dict(
        zip(rows.COLUMNS, rows.record(item, 1, chain.GENESIS, "h" * 64, now), strict=True)
    )
    event = rows.event_from_row(record)
    assert event.sequence == 1 and event.hash == "h" * 64 and event.HasField("ingest_time")
    assert rows.column_drift(record, event) is None
    for column, value in (("resource", "keys/x"), ("status_code", 5), ("actor_subject", "u")):
        assert rows.column_drift({**record, column: value}, event) == column
