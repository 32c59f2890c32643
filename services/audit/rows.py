"""Audit events as rows of `audit_events`, and back.

A row is the event's binary protobuf (`payload`, without the chain fields) plus the chain
columns and query columns copied out of it. The event a reader sees is the payload with the
chain columns set; `column_drift` names a query column that no longer matches its payload (a row
altered by hand), which verification reports like an altered payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.audit import chain
from services.common.audit.event import NAME_PREFIX, NO_TENANT
from soma.audit.v1 import resources_pb2 as pb

Row = Mapping[str, Any]

COLUMNS = (
    "tenant",
    "sequence",
    "id",
    "event_time",
    "ingest_time",
    "actor_subject",
    "actor_key_id",
    "actor_token_kid",
    "method",
    "resource",
    "decision",
    "status_code",
    "request_id",
    "previous_hash",
    "hash",
    "payload",
)


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value)
    return out


@dataclass
class Prepared:
    """An incoming event, normalized and ready to chain."""

    event: pb.AuditEvent  # without chain fields
    event_id: str
    payload: bytes
    canonical: bytes
    event_time: datetime


def prepare(payload: bytes, fallback_id: str, now: datetime) -> Prepared:
    """Parses an event off the wire. Normalizes what a chain needs: an id (the Nats-Msg-Id when
    the name is empty), a tenant (`_` for events of no tenant: failed authentication) and an
    event time; clears any chain fields an emitter set. Raises ValueError on a bad payload."""
    event = pb.AuditEvent()
    try:
        event.ParseFromString(payload)
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"not an AuditEvent: {error}") from None
    changed = False
    if not event.name:
        if not fallback_id:
            raise ValueError("event without a name or Nats-Msg-Id")
        event.name = NAME_PREFIX + fallback_id
        changed = True
    if not event.tenant:
        event.tenant = NO_TENANT
        changed = True
    if not event.HasField("event_time"):
        event.event_time.FromDatetime(now)
        changed = True
    for field in chain.CHAIN_FIELDS:
        if event.HasField(field) if field == "ingest_time" else getattr(event, field):
            event.ClearField(field)
            changed = True
    event_id = event.name.removeprefix(NAME_PREFIX)
    if not event_id or len(event_id) > 200:
        raise ValueError(f"event name {event.name[:80]!r} is not auditEvents/<id>")
    return Prepared(
        event=event,
        event_id=event_id,
        payload=event.SerializeToString() if changed else payload,
        canonical=chain.canonical_bytes(event),
        event_time=event.event_time.ToDatetime(tzinfo=UTC),
    )


def record(
    item: Prepared, sequence: int, previous_hash: str, hash_: str, ingest_time: datetime
) -> tuple[Any, ...]:
    """The row for COPY, in COLUMNS order."""
    event = item.event
    actor = event.actor
    return (
        event.tenant,
        sequence,
        item.event_id,
        item.event_time,
        ingest_time,
        actor.subject,
        actor.key_id,
        actor.token_kid,
        event.method,
        event.resource,
        event.decision,
        event.status_code,
        event.request_id,
        previous_hash,
        hash_,
        item.payload,
    )


def event_from_row(row: Row) -> pb.AuditEvent:
    event = pb.AuditEvent()
    event.ParseFromString(row["payload"])
    event.sequence = row["sequence"]
    event.previous_hash = row["previous_hash"]
    event.hash = row["hash"]
    stamp = timestamp(row["ingest_time"])
    if stamp is not None:
        event.ingest_time.CopyFrom(stamp)
    return event


def column_drift(row: Row, event: pb.AuditEvent) -> str | None:
    """The first query column that disagrees with the payload, or None."""
    actor = event.actor
    expected: dict[str, object] = {
        "tenant": event.tenant,
        "id": event.name.removeprefix(NAME_PREFIX),
        "actor_subject": actor.subject,
        "actor_key_id": actor.key_id,
        "actor_token_kid": actor.token_kid,
        "method": event.method,
        "resource": event.resource,
        "decision": event.decision,
        "status_code": event.status_code,
        "request_id": event.request_id,
    }
    for column, value in expected.items():
        if row[column] != value:
            return column
    if row["event_time"] != event.event_time.ToDatetime(tzinfo=UTC):  # both to the microsecond
        return "event_time"
    return None
