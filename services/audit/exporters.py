"""Export formats: one record per line, each carrying the event's chain fields.

* JSON Lines: the AuditEvent's proto3 JSON (`sequence`, `previousHash`, `hash` included), so
  `soma audit verify FILE` re-verifies it offline with services/common/audit/chain.py.
* CEF (ArcSight Common Event Format 0): `CEF:0|Soma|Soma Mesh|<version>|<method>|<name>|
  <severity>|<extensions>`; the chain in `cn1` (sequence), `cs5` (previous hash), `cs6` (hash).
* OCSF 1.1 API Activity (class_uid 6003), every event, and OCSF Authentication (class_uid 3002),
  only authentication events (IssueToken calls, UNAUTHENTICATED denials); the chain fields and
  whatever OCSF has no place for under `unmapped`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata

from google.protobuf import json_format
from google.rpc import code_pb2

from soma.audit.v1 import audit_pb2
from soma.audit.v1 import resources_pb2 as pb

NDJSON = "application/x-ndjson"
TEXT = "text/plain; charset=utf-8"
OCSF_VERSION = "1.1.0"
VENDOR = "Soma"
PRODUCT = "Soma Mesh"
CHUNK_BYTES = 64 * 1024

_READ_VERBS = ("Get", "List", "Stream", "Tail", "Export", "Verify", "Batch")


def product_version() -> str:
    try:
        return metadata.version("soma-mesh")
    except metadata.PackageNotFoundError:
        return "0.1.0"


VERSION = product_version()


# -- shared pieces ------------------------------------------------------------------------------


def _epoch_ms(event: pb.AuditEvent) -> int:
    return event.event_time.ToMilliseconds()


def _code_name(code: int) -> str:
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)


def _decision_name(decision: int) -> str:
    return pb.AuditDecision.Name(decision).removeprefix("AUDIT_DECISION_")


def _operation(method: str) -> tuple[str, str]:
    """`/soma.keys.v1.KeysService/CreateApiKey` -> (`soma.keys.v1.KeysService`, `CreateApiKey`)."""
    service, _, operation = method.lstrip("/").partition("/")
    return service, operation


def _endpoint(address: str) -> dict[str, object]:
    """`127.0.0.1:5000` / `[::1]:5000` -> {"ip": ..., "port": ...}; anything else as is."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        return {"ip": host.strip("[]"), "port": int(port)}
    return {"ip": address} if address else {}


def _chain(event: pb.AuditEvent) -> dict[str, object]:
    return {"sequence": event.sequence, "previous_hash": event.previous_hash, "hash": event.hash}


def is_authentication(event: pb.AuditEvent) -> bool:
    return event.method.endswith("/IssueToken") or event.status_code == code_pb2.UNAUTHENTICATED


def _failed(event: pb.AuditEvent) -> bool:
    return event.decision == pb.AUDIT_DECISION_DENY or event.status_code != code_pb2.OK


# -- JSON Lines ---------------------------------------------------------------------------------


def json_line(event: pb.AuditEvent) -> str:
    return json.dumps(json_format.MessageToDict(event), separators=(",", ":"), ensure_ascii=False)


# -- CEF ----------------------------------------------------------------------------------------


def _cef_header(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _cef_value(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("=", "\\=").replace("\n", "\\n").replace("\r", "\\r")


def cef_line(event: pb.AuditEvent) -> str:
    _, operation = _operation(event.method)
    decision = _decision_name(event.decision)
    severity = 7 if event.decision == pb.AUDIT_DECISION_DENY else 5 if _failed(event) else 3
    endpoint = _endpoint(event.client_address)
    extensions: list[tuple[str, object]] = [
        ("rt", _epoch_ms(event)),
        ("externalId", event.name.removeprefix("auditEvents/")),
        ("suser", event.actor.subject),
        ("suid", event.actor.key_id),
        ("src", endpoint.get("ip", "")),
        ("spt", endpoint.get("port", "")),
        ("requestClientApplication", event.user_agent),
        ("requestMethod", event.method),
        ("act", decision),
        ("outcome", _code_name(event.status_code)),
        ("reason", event.decision_reason),
        ("cs1Label", "resource"),
        ("cs1", event.resource),
        ("cs2Label", "tenant"),
        ("cs2", event.tenant),
        ("cs3Label", "requestId"),
        ("cs3", event.request_id),
        ("cs4Label", "traceId"),
        ("cs4", event.trace_id),
        ("cs5Label", "previousHash"),
        ("cs5", event.previous_hash),
        ("cs6Label", "hash"),
        ("cs6", event.hash),
        ("cn1Label", "sequence"),
        ("cn1", event.sequence),
    ]
    if event.detail:
        extensions.append(("msg", json.dumps(dict(sorted(event.detail.items())))))
    header = "|".join(
        _cef_header(str(part))
        for part in (
            "CEF:0",
            VENDOR,
            PRODUCT,
            VERSION,
            event.method or "unknown",
            f"{decision} {operation}".strip(),
            severity,
        )
    )
    body = " ".join(f"{key}={_cef_value(value)}" for key, value in extensions if value != "")
    return f"{header}|{body}"


# -- OCSF ---------------------------------------------------------------------------------------


def _ocsf_common(event: pb.AuditEvent, class_uid: int, activity_id: int) -> dict[str, object]:
    failed = _failed(event)
    service, _ = _operation(event.method)
    out: dict[str, object] = {
        "class_uid": class_uid,
        "activity_id": activity_id,
        "type_uid": class_uid * 100 + activity_id,
        "time": _epoch_ms(event),
        "severity_id": 3 if event.decision == pb.AUDIT_DECISION_DENY else 1,
        "status_id": 2 if failed else 1,
        "status": "Failure" if failed else "Success",
        "status_code": _code_name(event.status_code),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event.name.removeprefix("auditEvents/"),
            "tenant_uid": event.tenant,
            "correlation_uid": event.trace_id,
            "product": {"name": PRODUCT, "vendor_name": VENDOR, "version": VERSION},
        },
        "src_endpoint": _endpoint(event.client_address),
        "unmapped": {
            **_chain(event),
            "decision": _decision_name(event.decision),
            "request_id": event.request_id,
            "detail": dict(sorted(event.detail.items())),
            "service": service,
        },
    }
    if event.decision_reason:
        out["status_detail"] = event.decision_reason
    if event.user_agent:
        out["http_request"] = {"user_agent": event.user_agent}
    return out


def _user(event: pb.AuditEvent) -> dict[str, object]:
    actor = event.actor
    user: dict[str, object] = {"uid": actor.subject, "name": actor.subject}
    if actor.tenant:
        user["org"] = {"uid": actor.tenant}
    if actor.roles:
        user["groups"] = [{"name": role} for role in actor.roles]
    if actor.key_id:
        user["credential_uid"] = actor.key_id
    return user


def _api_activity_id(operation: str) -> int:
    if operation.startswith("Create") or operation.startswith("Issue"):
        return 1
    if operation.startswith(_READ_VERBS):
        return 2
    if operation.startswith(("Delete", "Revoke")):
        return 4
    if operation.startswith(("Update", "Rotate", "Close", "Send", "Set")):
        return 3
    return 99


_API_ACTIVITY = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}


def ocsf_api_activity(event: pb.AuditEvent) -> str:
    service, operation = _operation(event.method)
    activity_id = _api_activity_id(operation)
    out = _ocsf_common(event, 6003, activity_id)
    out.update(
        category_uid=6,
        category_name="Application Activity",
        class_name="API Activity",
        activity_name=_API_ACTIVITY[activity_id],
        actor={"user": _user(event)},
        api={
            "operation": operation,
            "service": {"name": service},
            "request": {"uid": event.request_id},
            "response": {"code": event.status_code},
        },
        cloud={"provider": PRODUCT},
        resources=[{"uid": event.resource}] if event.resource else [],
    )
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def ocsf_authentication(event: pb.AuditEvent) -> str | None:
    if not is_authentication(event):
        return None
    service, operation = _operation(event.method)
    out = _ocsf_common(event, 3002, 1)  # 1: Logon (a credential exchange or presentation)
    out.update(
        category_uid=3,
        category_name="Identity & Access Management",
        class_name="Authentication",
        activity_name="Logon",
        user=_user(event),
        service={"name": service},
        auth_protocol="Other",
        auth_protocol_id=99,
        is_mfa=False,
        logon_type="Network",
        logon_type_id=3,
    )
    out["unmapped"]["operation"] = operation  # type: ignore[index]
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFormat:
    content_type: str
    render: Callable[[pb.AuditEvent], str | None]  # None: the event is not in this format


FORMATS: dict[int, ExportFormat] = {
    audit_pb2.AUDIT_EXPORT_FORMAT_UNSPECIFIED: ExportFormat(NDJSON, json_line),
    audit_pb2.AUDIT_EXPORT_FORMAT_JSON_LINES: ExportFormat(NDJSON, json_line),
    audit_pb2.AUDIT_EXPORT_FORMAT_CEF: ExportFormat(TEXT, cef_line),
    audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_API_ACTIVITY: ExportFormat(NDJSON, ocsf_api_activity),
    audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION: ExportFormat(NDJSON, ocsf_authentication),
}


class Chunker:
    """Groups whole newline-terminated records into chunks of about `limit` bytes."""

    def __init__(self, limit: int = CHUNK_BYTES) -> None:
        self.limit = limit
        self._buffer: list[bytes] = []
        self._size = 0

    def add(self, line: str) -> bytes | None:
        """Buffers `line`; returns a full chunk when the buffer would grow past the limit."""
        data = line.encode("utf-8") + b"\n"
        full = None
        if self._buffer and self._size + len(data) > self.limit:
            full = self.flush()
        self._buffer.append(data)
        self._size += len(data)
        return full

    def flush(self) -> bytes | None:
        if not self._buffer:
            return None
        out = b"".join(self._buffer)
        self._buffer, self._size = [], 0
        return out


def chunks(
    render: Callable[[pb.AuditEvent], str | None],
    events: Iterable[pb.AuditEvent],
    limit: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The export of `events` as chunks (what ExportAuditEvents streams)."""
    chunker = Chunker(limit)
    for event in events:
        line = render(event)
        if line is not None and (full := chunker.add(line)) is not None:
            yield full
    last = chunker.flush()
    if last is not None:
        yield last
