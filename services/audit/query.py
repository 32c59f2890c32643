"""AuditEventFilter -> SQL: a WHERE clause over audit_events with numbered parameters.

The tenant is not read from the filter here: the servicer resolves it (caller's tenant, or any
tenant for a platform admin) and passes it in, so no query can leave the caller's tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from services.common.errors import InvalidArgument
from soma.audit.v1 import audit_pb2


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


@dataclass
class Where:
    clauses: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *values: Any) -> None:
        """`clause` uses `{}` for each value; they become $n in order."""
        numbers = []
        for value in values:
            self.params.append(value)
            numbers.append(f"${len(self.params)}")
        self.clauses.append(clause.format(*numbers))

    @property
    def sql(self) -> str:
        return " AND ".join(self.clauses) if self.clauses else "true"


def build_where(tenant: str, spec: audit_pb2.AuditEventFilter, *, times: bool = True) -> Where:
    where = Where()
    where.add("tenant = {}", tenant)
    if times and spec.HasField("start_time"):
        where.add("event_time >= {}", spec.start_time.ToDatetime(tzinfo=UTC))
    if times and spec.HasField("end_time"):
        where.add("event_time < {}", spec.end_time.ToDatetime(tzinfo=UTC))
    if spec.actor:
        where.add(
            "(actor_subject = {0} OR actor_key_id = {0} OR actor_token_kid = {0})", spec.actor
        )
    if spec.method:
        if spec.method.endswith("/"):
            where.add("method LIKE {}", _like_prefix(spec.method))
        else:
            where.add("method = {}", spec.method)
    if spec.resource:
        if spec.resource.endswith("*"):
            where.add("resource LIKE {}", _like_prefix(spec.resource[:-1]))
        else:
            where.add("resource = {}", spec.resource)
    if spec.decision:
        where.add("decision = {}", int(spec.decision))
    if spec.status_codes:
        where.add("status_code = ANY({}::int[])", [int(c) for c in spec.status_codes])
    if spec.request_id:
        where.add("request_id = {}", spec.request_id)
    return where


def check_filter(spec: audit_pb2.AuditEventFilter) -> None:
    if (
        spec.HasField("start_time")
        and spec.HasField("end_time")
        and spec.end_time.ToNanoseconds() <= spec.start_time.ToNanoseconds()
    ):
        raise InvalidArgument(
            "filter.end_time must be after filter.start_time", field="filter.end_time"
        )


def fingerprint(tenant: str, spec: audit_pb2.AuditEventFilter, order: int) -> dict[str, Any]:
    """What a page token is bound to: the same filter, tenant and order."""
    return {
        "tenant": tenant,
        "filter": spec.SerializeToString(deterministic=True).hex(),
        "o": order,
    }
