import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapsuleVisibility(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPSULE_VISIBILITY_UNSPECIFIED: _ClassVar[CapsuleVisibility]
    CAPSULE_VISIBILITY_PRIVATE: _ClassVar[CapsuleVisibility]
    CAPSULE_VISIBILITY_PUBLIC: _ClassVar[CapsuleVisibility]

class SignatureFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_FORMAT_UNSPECIFIED: _ClassVar[SignatureFormat]
    SIGNATURE_FORMAT_COSIGN: _ClassVar[SignatureFormat]
    SIGNATURE_FORMAT_SIGSTORE_BUNDLE: _ClassVar[SignatureFormat]

class SignatureAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_ALGORITHM_UNSPECIFIED: _ClassVar[SignatureAlgorithm]
    SIGNATURE_ALGORITHM_ECDSA_P256_SHA256: _ClassVar[SignatureAlgorithm]

class PublisherKeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUBLISHER_KEY_STATE_UNSPECIFIED: _ClassVar[PublisherKeyState]
    PUBLISHER_KEY_STATE_ACTIVE: _ClassVar[PublisherKeyState]
    PUBLISHER_KEY_STATE_REVOKED: _ClassVar[PublisherKeyState]

class VerificationResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERIFICATION_RESULT_UNSPECIFIED: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_VERIFIED: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_DIGEST_MISMATCH: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_BAD_SIGNATURE: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_UNKNOWN_KEY: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_KEY_REVOKED: _ClassVar[VerificationResult]
    VERIFICATION_RESULT_NO_SIGNATURE: _ClassVar[VerificationResult]

class InstallationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTALLATION_STATE_UNSPECIFIED: _ClassVar[InstallationState]
    INSTALLATION_STATE_PENDING: _ClassVar[InstallationState]
    INSTALLATION_STATE_AWAITING_APPROVAL: _ClassVar[InstallationState]
    INSTALLATION_STATE_INSTALLED: _ClassVar[InstallationState]
    INSTALLATION_STATE_FAILED: _ClassVar[InstallationState]
    INSTALLATION_STATE_REJECTED: _ClassVar[InstallationState]
    INSTALLATION_STATE_SUPERSEDED: _ClassVar[InstallationState]
    INSTALLATION_STATE_UNINSTALLED: _ClassVar[InstallationState]

class InstallPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTALL_PHASE_UNSPECIFIED: _ClassVar[InstallPhase]
    INSTALL_PHASE_QUEUED: _ClassVar[InstallPhase]
    INSTALL_PHASE_AWAITING_APPROVAL: _ClassVar[InstallPhase]
    INSTALL_PHASE_VERIFYING_SIGNATURE: _ClassVar[InstallPhase]
    INSTALL_PHASE_EXTRACTING: _ClassVar[InstallPhase]
    INSTALL_PHASE_ACTIVATING: _ClassVar[InstallPhase]
    INSTALL_PHASE_DONE: _ClassVar[InstallPhase]
    INSTALL_PHASE_FAILED: _ClassVar[InstallPhase]

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_REJECTED: _ClassVar[ApprovalState]
    APPROVAL_STATE_EXPIRED: _ClassVar[ApprovalState]
CAPSULE_VISIBILITY_UNSPECIFIED: CapsuleVisibility
CAPSULE_VISIBILITY_PRIVATE: CapsuleVisibility
CAPSULE_VISIBILITY_PUBLIC: CapsuleVisibility
SIGNATURE_FORMAT_UNSPECIFIED: SignatureFormat
SIGNATURE_FORMAT_COSIGN: SignatureFormat
SIGNATURE_FORMAT_SIGSTORE_BUNDLE: SignatureFormat
SIGNATURE_ALGORITHM_UNSPECIFIED: SignatureAlgorithm
SIGNATURE_ALGORITHM_ECDSA_P256_SHA256: SignatureAlgorithm
PUBLISHER_KEY_STATE_UNSPECIFIED: PublisherKeyState
PUBLISHER_KEY_STATE_ACTIVE: PublisherKeyState
PUBLISHER_KEY_STATE_REVOKED: PublisherKeyState
VERIFICATION_RESULT_UNSPECIFIED: VerificationResult
VERIFICATION_RESULT_VERIFIED: VerificationResult
VERIFICATION_RESULT_DIGEST_MISMATCH: VerificationResult
VERIFICATION_RESULT_BAD_SIGNATURE: VerificationResult
VERIFICATION_RESULT_UNKNOWN_KEY: VerificationResult
VERIFICATION_RESULT_KEY_REVOKED: VerificationResult
VERIFICATION_RESULT_NO_SIGNATURE: VerificationResult
INSTALLATION_STATE_UNSPECIFIED: InstallationState
INSTALLATION_STATE_PENDING: InstallationState
INSTALLATION_STATE_AWAITING_APPROVAL: InstallationState
INSTALLATION_STATE_INSTALLED: InstallationState
INSTALLATION_STATE_FAILED: InstallationState
INSTALLATION_STATE_REJECTED: InstallationState
INSTALLATION_STATE_SUPERSEDED: InstallationState
INSTALLATION_STATE_UNINSTALLED: InstallationState
INSTALL_PHASE_UNSPECIFIED: InstallPhase
INSTALL_PHASE_QUEUED: InstallPhase
INSTALL_PHASE_AWAITING_APPROVAL: InstallPhase
INSTALL_PHASE_VERIFYING_SIGNATURE: InstallPhase
INSTALL_PHASE_EXTRACTING: InstallPhase
INSTALL_PHASE_ACTIVATING: InstallPhase
INSTALL_PHASE_DONE: InstallPhase
INSTALL_PHASE_FAILED: InstallPhase
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPROVED: ApprovalState
APPROVAL_STATE_REJECTED: ApprovalState
APPROVAL_STATE_EXPIRED: ApprovalState

class CapsuleManifest(_message.Message):
    __slots__ = ("name", "version", "description", "publisher", "entrypoint", "permissions", "homepage", "license")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    HOMEPAGE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    description: str
    publisher: str
    entrypoint: str
    permissions: _containers.RepeatedScalarFieldContainer[str]
    homepage: str
    license: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., description: _Optional[str] = ..., publisher: _Optional[str] = ..., entrypoint: _Optional[str] = ..., permissions: _Optional[_Iterable[str]] = ..., homepage: _Optional[str] = ..., license: _Optional[str] = ...) -> None: ...

class CapsuleSignature(_message.Message):
    __slots__ = ("format", "algorithm", "signature", "publisher_key", "key_fingerprint", "result", "verify_time")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIME_FIELD_NUMBER: _ClassVar[int]
    format: SignatureFormat
    algorithm: SignatureAlgorithm
    signature: str
    publisher_key: str
    key_fingerprint: str
    result: VerificationResult
    verify_time: _timestamp_pb2.Timestamp
    def __init__(self, format: _Optional[_Union[SignatureFormat, str]] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ..., signature: _Optional[str] = ..., publisher_key: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., result: _Optional[_Union[VerificationResult, str]] = ..., verify_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Capsule(_message.Message):
    __slots__ = ("name", "tenant", "description", "latest_version", "install_count", "verified", "permissions", "homepage", "license", "visibility", "create_time", "update_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTALL_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    HOMEPAGE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    description: str
    latest_version: str
    install_count: int
    verified: bool
    permissions: _containers.RepeatedScalarFieldContainer[str]
    homepage: str
    license: str
    visibility: CapsuleVisibility
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., description: _Optional[str] = ..., latest_version: _Optional[str] = ..., install_count: _Optional[int] = ..., verified: _Optional[bool] = ..., permissions: _Optional[_Iterable[str]] = ..., homepage: _Optional[str] = ..., license: _Optional[str] = ..., visibility: _Optional[_Union[CapsuleVisibility, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CapsuleVersion(_message.Message):
    __slots__ = ("name", "tenant", "version", "digest", "size_bytes", "entry_count", "uncompressed_size_bytes", "manifest", "signature", "yanked", "yank_reason", "yank_time", "uploader", "publish_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    YANKED_FIELD_NUMBER: _ClassVar[int]
    YANK_REASON_FIELD_NUMBER: _ClassVar[int]
    YANK_TIME_FIELD_NUMBER: _ClassVar[int]
    UPLOADER_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    version: str
    digest: str
    size_bytes: int
    entry_count: int
    uncompressed_size_bytes: int
    manifest: CapsuleManifest
    signature: CapsuleSignature
    yanked: bool
    yank_reason: str
    yank_time: _timestamp_pb2.Timestamp
    uploader: str
    publish_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., entry_count: _Optional[int] = ..., uncompressed_size_bytes: _Optional[int] = ..., manifest: _Optional[_Union[CapsuleManifest, _Mapping]] = ..., signature: _Optional[_Union[CapsuleSignature, _Mapping]] = ..., yanked: _Optional[bool] = ..., yank_reason: _Optional[str] = ..., yank_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uploader: _Optional[str] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PublisherKey(_message.Message):
    __slots__ = ("name", "tenant", "display_name", "public_key_pem", "fingerprint", "algorithm", "state", "creator", "create_time", "revoke_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    display_name: str
    public_key_pem: str
    fingerprint: str
    algorithm: SignatureAlgorithm
    state: PublisherKeyState
    creator: str
    create_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., display_name: _Optional[str] = ..., public_key_pem: _Optional[str] = ..., fingerprint: _Optional[str] = ..., algorithm: _Optional[_Union[SignatureAlgorithm, str]] = ..., state: _Optional[_Union[PublisherKeyState, str]] = ..., creator: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Installation(_message.Message):
    __slots__ = ("name", "tenant", "capsule", "version", "digest", "requester", "state", "approval", "path", "file_count", "size_bytes", "error", "create_time", "complete_time", "duration", "remove_time", "remover")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TIME_FIELD_NUMBER: _ClassVar[int]
    REMOVER_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    capsule: str
    version: str
    digest: str
    requester: str
    state: InstallationState
    approval: str
    path: str
    file_count: int
    size_bytes: int
    error: _status_pb2.Status
    create_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    duration: _duration_pb2.Duration
    remove_time: _timestamp_pb2.Timestamp
    remover: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., capsule: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., requester: _Optional[str] = ..., state: _Optional[_Union[InstallationState, str]] = ..., approval: _Optional[str] = ..., path: _Optional[str] = ..., file_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., remove_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., remover: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("name", "tenant", "installation", "capsule", "version", "permissions", "requester", "policy_reason", "state", "approver", "comment", "create_time", "expire_time", "decide_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    INSTALLATION_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    POLICY_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    installation: str
    capsule: str
    version: str
    permissions: _containers.RepeatedScalarFieldContainer[str]
    requester: str
    policy_reason: str
    state: ApprovalState
    approver: str
    comment: str
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    decide_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., installation: _Optional[str] = ..., capsule: _Optional[str] = ..., version: _Optional[str] = ..., permissions: _Optional[_Iterable[str]] = ..., requester: _Optional[str] = ..., policy_reason: _Optional[str] = ..., state: _Optional[_Union[ApprovalState, str]] = ..., approver: _Optional[str] = ..., comment: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
