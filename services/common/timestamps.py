"""`google.protobuf.Timestamp` fields from the datetimes the database returns."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime | None) -> Timestamp | None:
    """`value` as a Timestamp; None (an unset field) for a NULL column."""
    if value is None:
        return None
    out = Timestamp()
    out.FromDatetime(value)
    return out
