import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import code_pb2 as _code_pb2
from soma.audit.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditEventOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_EVENT_ORDER_UNSPECIFIED: _ClassVar[AuditEventOrder]
    AUDIT_EVENT_ORDER_NEWEST_FIRST: _ClassVar[AuditEventOrder]
    AUDIT_EVENT_ORDER_OLDEST_FIRST: _ClassVar[AuditEventOrder]

class AuditExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_EXPORT_FORMAT_UNSPECIFIED: _ClassVar[AuditExportFormat]
    AUDIT_EXPORT_FORMAT_JSON_LINES: _ClassVar[AuditExportFormat]
    AUDIT_EXPORT_FORMAT_CEF: _ClassVar[AuditExportFormat]
    AUDIT_EXPORT_FORMAT_OCSF_API_ACTIVITY: _ClassVar[AuditExportFormat]
    AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION: _ClassVar[AuditExportFormat]

class ChainBreakReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHAIN_BREAK_REASON_UNSPECIFIED: _ClassVar[ChainBreakReason]
    CHAIN_BREAK_REASON_HASH_MISMATCH: _ClassVar[ChainBreakReason]
    CHAIN_BREAK_REASON_PREVIOUS_HASH_MISMATCH: _ClassVar[ChainBreakReason]
    CHAIN_BREAK_REASON_MISSING_EVENT: _ClassVar[ChainBreakReason]
    CHAIN_BREAK_REASON_CHECKPOINT_MISMATCH: _ClassVar[ChainBreakReason]
AUDIT_EVENT_ORDER_UNSPECIFIED: AuditEventOrder
AUDIT_EVENT_ORDER_NEWEST_FIRST: AuditEventOrder
AUDIT_EVENT_ORDER_OLDEST_FIRST: AuditEventOrder
AUDIT_EXPORT_FORMAT_UNSPECIFIED: AuditExportFormat
AUDIT_EXPORT_FORMAT_JSON_LINES: AuditExportFormat
AUDIT_EXPORT_FORMAT_CEF: AuditExportFormat
AUDIT_EXPORT_FORMAT_OCSF_API_ACTIVITY: AuditExportFormat
AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION: AuditExportFormat
CHAIN_BREAK_REASON_UNSPECIFIED: ChainBreakReason
CHAIN_BREAK_REASON_HASH_MISMATCH: ChainBreakReason
CHAIN_BREAK_REASON_PREVIOUS_HASH_MISMATCH: ChainBreakReason
CHAIN_BREAK_REASON_MISSING_EVENT: ChainBreakReason
CHAIN_BREAK_REASON_CHECKPOINT_MISMATCH: ChainBreakReason

class AuditEventFilter(_message.Message):
    __slots__ = ("tenant", "start_time", "end_time", "actor", "method", "resource", "decision", "status_codes", "request_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    actor: str
    method: str
    resource: str
    decision: _resources_pb2.AuditDecision
    status_codes: _containers.RepeatedScalarFieldContainer[_code_pb2.Code]
    request_id: str
    def __init__(self, tenant: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., method: _Optional[str] = ..., resource: _Optional[str] = ..., decision: _Optional[_Union[_resources_pb2.AuditDecision, str]] = ..., status_codes: _Optional[_Iterable[_Union[_code_pb2.Code, str]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetAuditEventRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter", "order")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: AuditEventFilter
    order: AuditEventOrder
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[_Union[AuditEventFilter, _Mapping]] = ..., order: _Optional[_Union[AuditEventOrder, str]] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("audit_events", "next_page_token")
    AUDIT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    audit_events: _containers.RepeatedCompositeFieldContainer[_resources_pb2.AuditEvent]
    next_page_token: str
    def __init__(self, audit_events: _Optional[_Iterable[_Union[_resources_pb2.AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetRetentionPolicyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UpdateRetentionPolicyRequest(_message.Message):
    __slots__ = ("retention_policy", "update_mask", "request_id")
    RETENTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    retention_policy: _resources_pb2.RetentionPolicy
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, retention_policy: _Optional[_Union[_resources_pb2.RetentionPolicy, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TailAuditEventsRequest(_message.Message):
    __slots__ = ("filter", "after_sequence", "live_only")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    filter: AuditEventFilter
    after_sequence: int
    live_only: bool
    def __init__(self, filter: _Optional[_Union[AuditEventFilter, _Mapping]] = ..., after_sequence: _Optional[int] = ..., live_only: _Optional[bool] = ...) -> None: ...

class VerifyAuditChainRequest(_message.Message):
    __slots__ = ("tenant", "start_sequence", "end_sequence")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    END_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    start_sequence: int
    end_sequence: int
    def __init__(self, tenant: _Optional[str] = ..., start_sequence: _Optional[int] = ..., end_sequence: _Optional[int] = ...) -> None: ...

class ChainBreak(_message.Message):
    __slots__ = ("sequence", "event", "reason", "expected_hash", "actual_hash", "message")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_HASH_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_HASH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    event: str
    reason: ChainBreakReason
    expected_hash: str
    actual_hash: str
    message: str
    def __init__(self, sequence: _Optional[int] = ..., event: _Optional[str] = ..., reason: _Optional[_Union[ChainBreakReason, str]] = ..., expected_hash: _Optional[str] = ..., actual_hash: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class VerifyAuditChainResponse(_message.Message):
    __slots__ = ("tenant", "ok", "first_break", "anchor", "start_sequence", "end_sequence", "events_verified", "head_hash", "verify_time")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FIRST_BREAK_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    START_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    END_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    ok: bool
    first_break: ChainBreak
    anchor: _resources_pb2.AuditChainCheckpoint
    start_sequence: int
    end_sequence: int
    events_verified: int
    head_hash: str
    verify_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant: _Optional[str] = ..., ok: _Optional[bool] = ..., first_break: _Optional[_Union[ChainBreak, _Mapping]] = ..., anchor: _Optional[_Union[_resources_pb2.AuditChainCheckpoint, _Mapping]] = ..., start_sequence: _Optional[int] = ..., end_sequence: _Optional[int] = ..., events_verified: _Optional[int] = ..., head_hash: _Optional[str] = ..., verify_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportAuditEventsRequest(_message.Message):
    __slots__ = ("filter", "format")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    filter: AuditEventFilter
    format: AuditExportFormat
    def __init__(self, filter: _Optional[_Union[AuditEventFilter, _Mapping]] = ..., format: _Optional[_Union[AuditExportFormat, str]] = ...) -> None: ...
