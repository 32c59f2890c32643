"""Audit events: building them from a call, and keeping secrets out of them.

An event is `soma.audit.v1.AuditEvent` without the chain fields (`sequence`, `previous_hash`,
`hash`, `ingest_time`: the Audit service sets those). On the wire (JetStream stream `AUDIT`,
subject `audit.<tenant>.<service>`, header `Nats-Msg-Id` = event id) the payload is the event's
binary protobuf encoding (`encode` / `decode`).

Redaction: the actor carries subject, key id and token kid only; `detail` holds at most 16
entries of at most 200 characters, and drops the value of any field whose name mentions a
secret, token, key, password or pepper (key ids excepted) and any value that looks like an API
key, a JWT, a bearer header or a PEM block, whatever its field is called.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import descriptor, timestamp_pb2
from google.protobuf.message import Message

from services.common.auth.principal import Principal
from services.common.tracing import current_trace_id
from soma.audit.v1 import resources_pb2 as pb

STREAM = "AUDIT"
SUBJECT_PREFIX = "audit"
SUBJECTS = ("audit.>",)
NAME_PREFIX = "auditEvents/"
CHAIN_FIELDS = ("sequence", "previous_hash", "hash", "ingest_time")
NO_TENANT = "_"  # subject token for events without a tenant (failed authentication)

MAX_DETAIL_ENTRIES = 16
MAX_VALUE_CHARS = 200
REDACTED = "[redacted]"

ALLOW = pb.AUDIT_DECISION_ALLOW
DENY = pb.AUDIT_DECISION_DENY

_SENSITIVE_NAME = re.compile(r"secret|token|key|password|passwd|pepper|credential|authoriz", re.I)
_KEY_ID_NAME = re.compile(r"^(?:\w*_)?(?:key_id|kid|key_ids)$")
_SECRET_VALUE = re.compile(
    r"soma_[A-Za-z0-9_]{8,}"  # an API key (services.common.apikeys format)
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\."  # a JWT (base64url JSON header + claims)
    r"|\bbearer\s+\S"
    r"|-----BEGIN [A-Z ]+-----",
    re.I,
)
_SUBJECT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_RESOURCE_FIELDS = ("name", "parent", "session", "resource")


# -- ids, subjects, wire form --------------------------------------------------------------


def new_event_id() -> str:
    return str(uuid.uuid4())


def event_id(event: pb.AuditEvent) -> str:
    """The id in `auditEvents/<id>`: also the event's `Nats-Msg-Id`."""
    return event.name.removeprefix(NAME_PREFIX)


def service_of(method: str) -> str:
    """`/soma.keys.v1.KeysService/CreateApiKey` -> `keys`."""
    full_service = method.lstrip("/").partition("/")[0]
    parts = full_service.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "soma" else full_service or "unknown"


def subject_for(event: pb.AuditEvent) -> str:
    """`audit.<tenant>.<service>`; characters a NATS token cannot hold become `_`."""
    tenant = _SUBJECT_TOKEN.sub("_", event.tenant) or NO_TENANT
    service = _SUBJECT_TOKEN.sub("_", service_of(event.method)) or "unknown"
    return f"{SUBJECT_PREFIX}.{tenant}.{service}"


def encode(event: pb.AuditEvent) -> bytes:
    return event.SerializeToString()


def decode(payload: bytes) -> pb.AuditEvent:
    event = pb.AuditEvent()
    event.ParseFromString(payload)
    return event


# -- redaction ------------------------------------------------------------------------------


def is_sensitive_name(name: str) -> bool:
    """By the last component: `api_key` (IssueToken's secret) is, `api_key.display_name` is not."""
    leaf = name.rsplit(".", 1)[-1]
    return bool(_SENSITIVE_NAME.search(leaf)) and not _KEY_ID_NAME.search(leaf)


def looks_secret(value: str) -> bool:
    return bool(_SECRET_VALUE.search(value))


def clean_value(value: str) -> str:
    """A detail value: redacted if it looks like a credential, else truncated."""
    if looks_secret(value):
        return REDACTED
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 1] + "…"


def redact_detail(items: Mapping[str, object] | Iterable[tuple[str, object]]) -> dict[str, str]:
    """At most 16 entries, names and values cleaned, secrets replaced by `[redacted]`."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out: dict[str, str] = {}
    for name, value in pairs:
        if len(out) >= MAX_DETAIL_ENTRIES:
            break
        key = str(name)[:64]
        if not key:
            continue
        text = value if isinstance(value, str) else _text(value)
        out[key] = REDACTED if is_sensitive_name(key) else clean_value(text)
    return out


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(_text(v) if not isinstance(v, str) else v for v in value)
    return str(value)


def _field_text(field: descriptor.FieldDescriptor, value: Any) -> str | None:
    """A scalar field as text; None for message fields other than well-known leaves."""
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        full = field.message_type.full_name
        if full == "google.protobuf.Timestamp":
            return str(value.ToJsonString())
        if full == "google.protobuf.Duration":
            return str(value.ToJsonString())
        if full == "google.protobuf.FieldMask":
            return ",".join(value.paths)
        return None
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else str(value)
    return _text(value)


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def request_detail(request: object) -> dict[str, str]:
    """The set fields of a request (and of its direct sub-messages, as `outer.inner`), redacted.
    Field names, not values, decide most redaction: `api_key` (a secret in IssueToken) goes,
    `api_key.display_name` stays."""
    if not isinstance(request, Message):
        return {}
    pairs: list[tuple[str, object]] = []
    for field, value in request.ListFields():
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and not _is_repeated(field):
            text = _field_text(field, value)
            if text is not None:
                pairs.append((field.name, text))
            else:
                for inner, inner_value in value.ListFields():
                    if _is_repeated(inner) and inner.type == inner.TYPE_MESSAGE:
                        continue
                    leaf = _leaf_text(inner, inner_value)
                    if leaf is not None:
                        pairs.append((f"{field.name}.{inner.name}", leaf))
            continue
        leaf = _leaf_text(field, value)
        if leaf is not None:
            pairs.append((field.name, leaf))
    return redact_detail(pairs)


def _leaf_text(field: descriptor.FieldDescriptor, value: Any) -> str | None:
    if _is_repeated(field):
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE or isinstance(value, Mapping):
            return None
        texts = [_field_text(field, v) for v in value]
        return ",".join(t for t in texts if t is not None)
    return _field_text(field, value)


# -- what a call tells us --------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """Where a call came from, read once from its metadata."""

    client_address: str = ""
    user_agent: str = ""
    request_id: str = ""
    trace_id: str = ""


def trace_id_from(traceparent: str | None) -> str:
    """The trace id of a W3C `traceparent` (version-traceid-parentid-flags), else ""."""
    if not traceparent:
        return ""
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return ""
    return match.group(1)


def peer_address(peer: str | None) -> str:
    """grpc's `ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` -> `127.0.0.1:5000` / `[::1]:5000`."""
    if not peer:
        return ""
    scheme, sep, rest = peer.partition(":")
    address = rest if sep and scheme in ("ipv4", "ipv6", "unix") else peer
    return address[:MAX_VALUE_CHARS]


def call_info(metadata: Iterable[Any], peer: str | None, request_id: str = "") -> CallInfo:
    """From invocation metadata ((key, value) pairs) and `context.peer()`. Envoy's
    `x-forwarded-for` (first hop = the client) wins over the peer, which is Envoy itself."""
    forwarded = user_agent = traceparent = header_request_id = ""
    for key, value in metadata:
        if isinstance(value, bytes):
            continue
        if key == "x-forwarded-for" and not forwarded:
            forwarded = value.split(",")[0].strip()
        elif key == "user-agent" and not user_agent:
            user_agent = value
        elif key == "traceparent" and not traceparent:
            traceparent = value
        elif key == "x-request-id" and not header_request_id:
            header_request_id = value
    return CallInfo(
        client_address=clean_value(forwarded) if forwarded else peer_address(peer),
        user_agent=clean_value(user_agent),
        request_id=clean_value(request_id or header_request_id),
        # The current span's trace (tracing on) is the one every log line of the call names;
        # else the caller's traceparent, e.g. Envoy's, still links the event to its request.
        trace_id=current_trace_id() or trace_id_from(traceparent),
    )


# -- the event ---------------------------------------------------------------------------------


def actor_of(principal: Principal | None) -> pb.AuditActor:
    """Who called: identifiers only, never a credential."""
    if principal is None:
        return pb.AuditActor()
    return pb.AuditActor(
        subject=principal.subject,
        tenant=principal.tenant,
        key_id=principal.key_id or "",
        token_kid=principal.token_kid or "",
        roles=sorted(principal.roles),
    )


def status_number(code: grpc.StatusCode | int | None) -> int:
    """A grpc.StatusCode (or number) as its google.rpc.Code number; None is OK."""
    if code is None:
        return 0
    if isinstance(code, grpc.StatusCode):
        return int(code.value[0])
    return int(code)


def resource_of(request: object, response: object = None) -> str:
    """The resource acted on: the response's name (a create's new resource), else the request's
    `name`/`parent`/`session`/`resource`, else a sub-message's `name` (update requests)."""
    for message in (response, request):
        found = _resource_in(message)
        if found:
            return found
    return ""


def _resource_in(message: object) -> str:
    if not isinstance(message, Message):
        return ""
    fields = message.DESCRIPTOR.fields_by_name
    for name in _RESOURCE_FIELDS:
        field = fields.get(name)
        if field is not None and field.type == field.TYPE_STRING and not _is_repeated(field):
            value = getattr(message, name)
            if value:
                return str(value)[:MAX_VALUE_CHARS]
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_MESSAGE and not _is_repeated(field):
            inner = getattr(message, field.name)
            inner_name = inner.DESCRIPTOR.fields_by_name.get("name")
            if inner_name is not None and inner_name.type == inner_name.TYPE_STRING and inner.name:
                return str(inner.name)[:MAX_VALUE_CHARS]
    return ""


def tenant_of(resource: str, response: object, principal: Principal | None) -> str:
    """The tenant whose chain gets the event: the resource's (a platform admin acting on
    another tenant), else the caller's."""
    if resource.startswith("tenants/"):
        return resource.split("/")[1]
    if isinstance(response, Message):
        for message in (response, *_submessages(response)):
            field = message.DESCRIPTOR.fields_by_name.get("tenant")
            if field is not None and field.type == field.TYPE_STRING:
                value = getattr(message, "tenant")  # noqa: B009
                if value:
                    return str(value)
    return principal.tenant if principal is not None else ""


def _submessages(message: Message) -> list[Message]:
    return [
        getattr(message, f.name)
        for f in message.DESCRIPTOR.fields
        if f.type == f.TYPE_MESSAGE and not _is_repeated(f) and message.HasField(f.name)
    ]


def build_event(
    *,
    method: str,
    principal: Principal | None,
    allow: bool,
    reason: str,
    status_code: grpc.StatusCode | int | None,
    call: CallInfo,
    resource: str = "",
    tenant: str | None = None,
    detail: Mapping[str, object] | None = None,
    event_time: datetime | None = None,
    event_id: str | None = None,
) -> pb.AuditEvent:
    """One audit event. `tenant` defaults to the principal's."""
    event = pb.AuditEvent(
        name=NAME_PREFIX + (event_id or new_event_id()),
        tenant=tenant if tenant is not None else (principal.tenant if principal else ""),
        actor=actor_of(principal),
        client_address=call.client_address,
        user_agent=call.user_agent,
        method=method,
        resource=resource,
        decision=ALLOW if allow else DENY,
        decision_reason=clean_value(reason),
        status_code=status_number(status_code),
        request_id=call.request_id,
        trace_id=call.trace_id,
        detail=redact_detail(detail or {}),
    )
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(event_time or datetime.now(UTC))
    event.event_time.CopyFrom(stamp)
    return event
