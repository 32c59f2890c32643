import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from soma.capsule.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapsuleOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPSULE_ORDER_UNSPECIFIED: _ClassVar[CapsuleOrder]
    CAPSULE_ORDER_INSTALL_COUNT: _ClassVar[CapsuleOrder]
    CAPSULE_ORDER_UPDATE_TIME: _ClassVar[CapsuleOrder]
    CAPSULE_ORDER_NAME: _ClassVar[CapsuleOrder]
CAPSULE_ORDER_UNSPECIFIED: CapsuleOrder
CAPSULE_ORDER_INSTALL_COUNT: CapsuleOrder
CAPSULE_ORDER_UPDATE_TIME: CapsuleOrder
CAPSULE_ORDER_NAME: CapsuleOrder

class GetCapsuleRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCapsulesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "query", "publisher", "verified_only", "permission", "order_by")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_ONLY_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    query: str
    publisher: str
    verified_only: bool
    permission: str
    order_by: CapsuleOrder
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., query: _Optional[str] = ..., publisher: _Optional[str] = ..., verified_only: _Optional[bool] = ..., permission: _Optional[str] = ..., order_by: _Optional[_Union[CapsuleOrder, str]] = ...) -> None: ...

class ListCapsulesResponse(_message.Message):
    __slots__ = ("capsules", "next_page_token")
    CAPSULES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    capsules: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Capsule]
    next_page_token: str
    def __init__(self, capsules: _Optional[_Iterable[_Union[_resources_pb2.Capsule, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCapsuleVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCapsuleVersionsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCapsuleVersionsResponse(_message.Message):
    __slots__ = ("capsule_versions", "next_page_token")
    CAPSULE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    capsule_versions: _containers.RepeatedCompositeFieldContainer[_resources_pb2.CapsuleVersion]
    next_page_token: str
    def __init__(self, capsule_versions: _Optional[_Iterable[_Union[_resources_pb2.CapsuleVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetPublisherKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPublisherKeysRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: _resources_pb2.PublisherKeyState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[_resources_pb2.PublisherKeyState, str]] = ...) -> None: ...

class ListPublisherKeysResponse(_message.Message):
    __slots__ = ("publisher_keys", "next_page_token")
    PUBLISHER_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    publisher_keys: _containers.RepeatedCompositeFieldContainer[_resources_pb2.PublisherKey]
    next_page_token: str
    def __init__(self, publisher_keys: _Optional[_Iterable[_Union[_resources_pb2.PublisherKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetInstallationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListInstallationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "capsule", "state", "requester")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    capsule: str
    state: _resources_pb2.InstallationState
    requester: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., capsule: _Optional[str] = ..., state: _Optional[_Union[_resources_pb2.InstallationState, str]] = ..., requester: _Optional[str] = ...) -> None: ...

class ListInstallationsResponse(_message.Message):
    __slots__ = ("installations", "next_page_token")
    INSTALLATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    installations: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Installation]
    next_page_token: str
    def __init__(self, installations: _Optional[_Iterable[_Union[_resources_pb2.Installation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetApprovalRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "capsule")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: _resources_pb2.ApprovalState
    capsule: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[_resources_pb2.ApprovalState, str]] = ..., capsule: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Approval]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[_resources_pb2.Approval, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RegisterPublisherKeyRequest(_message.Message):
    __slots__ = ("publisher_key", "request_id")
    PUBLISHER_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    publisher_key: _resources_pb2.PublisherKey
    request_id: str
    def __init__(self, publisher_key: _Optional[_Union[_resources_pb2.PublisherKey, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RevokePublisherKeyRequest(_message.Message):
    __slots__ = ("name", "reason", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PublishCapsuleMetadata(_message.Message):
    __slots__ = ("capsule", "version", "size_bytes", "digest", "cosign_signature", "sigstore_bundle", "publisher_key", "visibility", "request_id")
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    COSIGN_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGSTORE_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_KEY_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    capsule: str
    version: str
    size_bytes: int
    digest: str
    cosign_signature: str
    sigstore_bundle: str
    publisher_key: str
    visibility: _resources_pb2.CapsuleVisibility
    request_id: str
    def __init__(self, capsule: _Optional[str] = ..., version: _Optional[str] = ..., size_bytes: _Optional[int] = ..., digest: _Optional[str] = ..., cosign_signature: _Optional[str] = ..., sigstore_bundle: _Optional[str] = ..., publisher_key: _Optional[str] = ..., visibility: _Optional[_Union[_resources_pb2.CapsuleVisibility, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PublishCapsuleRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: PublishCapsuleMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[PublishCapsuleMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class YankCapsuleVersionRequest(_message.Message):
    __slots__ = ("name", "reason", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class VerifyCapsuleVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class VerifyCapsuleVersionResponse(_message.Message):
    __slots__ = ("name", "verified", "result", "message", "digest", "signature", "verify_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    verified: bool
    result: _resources_pb2.VerificationResult
    message: str
    digest: str
    signature: _resources_pb2.CapsuleSignature
    verify_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., verified: _Optional[bool] = ..., result: _Optional[_Union[_resources_pb2.VerificationResult, str]] = ..., message: _Optional[str] = ..., digest: _Optional[str] = ..., signature: _Optional[_Union[_resources_pb2.CapsuleSignature, _Mapping]] = ..., verify_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class InstallCapsuleRequest(_message.Message):
    __slots__ = ("name", "version", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class InstallProgress(_message.Message):
    __slots__ = ("installation", "phase", "percent", "files_done", "files_total", "bytes_done", "bytes_total", "message", "approval", "error", "result", "event_time")
    INSTALLATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    FILES_DONE_FIELD_NUMBER: _ClassVar[int]
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    installation: str
    phase: _resources_pb2.InstallPhase
    percent: float
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    message: str
    approval: str
    error: _status_pb2.Status
    result: _resources_pb2.Installation
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, installation: _Optional[str] = ..., phase: _Optional[_Union[_resources_pb2.InstallPhase, str]] = ..., percent: _Optional[float] = ..., files_done: _Optional[int] = ..., files_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., approval: _Optional[str] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., result: _Optional[_Union[_resources_pb2.Installation, _Mapping]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UninstallCapsuleRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ApproveCapsuleRequest(_message.Message):
    __slots__ = ("name", "comment", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    comment: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., comment: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RejectCapsuleRequest(_message.Message):
    __slots__ = ("name", "reason", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...
