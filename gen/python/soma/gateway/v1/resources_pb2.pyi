import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_ACTIVE: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]

class MessageRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_ROLE_UNSPECIFIED: _ClassVar[MessageRole]
    MESSAGE_ROLE_USER: _ClassVar[MessageRole]
    MESSAGE_ROLE_AGENT: _ClassVar[MessageRole]

class MessageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_STATE_UNSPECIFIED: _ClassVar[MessageState]
    MESSAGE_STATE_QUEUED: _ClassVar[MessageState]
    MESSAGE_STATE_ANSWERED: _ClassVar[MessageState]
    MESSAGE_STATE_FAILED: _ClassVar[MessageState]
    MESSAGE_STATE_COMPLETE: _ClassVar[MessageState]
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_ACTIVE: SessionState
SESSION_STATE_CLOSED: SessionState
MESSAGE_ROLE_UNSPECIFIED: MessageRole
MESSAGE_ROLE_USER: MessageRole
MESSAGE_ROLE_AGENT: MessageRole
MESSAGE_STATE_UNSPECIFIED: MessageState
MESSAGE_STATE_QUEUED: MessageState
MESSAGE_STATE_ANSWERED: MessageState
MESSAGE_STATE_FAILED: MessageState
MESSAGE_STATE_COMPLETE: MessageState

class Session(_message.Message):
    __slots__ = ("name", "tenant", "display_name", "agent", "labels", "state", "partition", "message_count", "last_event_sequence", "create_time", "update_time", "close_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    display_name: str
    agent: str
    labels: _containers.ScalarMap[str, str]
    state: SessionState
    partition: int
    message_count: int
    last_event_sequence: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    close_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., display_name: _Optional[str] = ..., agent: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[SessionState, str]] = ..., partition: _Optional[int] = ..., message_count: _Optional[int] = ..., last_event_sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., close_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("name", "role", "content", "tool", "state", "reply", "cache_hit", "error", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: MessageRole
    content: str
    tool: str
    state: MessageState
    reply: str
    cache_hit: bool
    error: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[MessageRole, str]] = ..., content: _Optional[str] = ..., tool: _Optional[str] = ..., state: _Optional[_Union[MessageState, str]] = ..., reply: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., error: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SessionStatusChange(_message.Message):
    __slots__ = ("previous_state", "state")
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    previous_state: SessionState
    state: SessionState
    def __init__(self, previous_state: _Optional[_Union[SessionState, str]] = ..., state: _Optional[_Union[SessionState, str]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session", "sequence", "create_time", "message_queued", "agent_reply", "message_failed", "status_change")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_QUEUED_FIELD_NUMBER: _ClassVar[int]
    AGENT_REPLY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FAILED_FIELD_NUMBER: _ClassVar[int]
    STATUS_CHANGE_FIELD_NUMBER: _ClassVar[int]
    session: str
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    message_queued: Message
    agent_reply: Message
    message_failed: Message
    status_change: SessionStatusChange
    def __init__(self, session: _Optional[str] = ..., sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message_queued: _Optional[_Union[Message, _Mapping]] = ..., agent_reply: _Optional[_Union[Message, _Mapping]] = ..., message_failed: _Optional[_Union[Message, _Mapping]] = ..., status_change: _Optional[_Union[SessionStatusChange, _Mapping]] = ...) -> None: ...

class PartitionStats(_message.Message):
    __slots__ = ("partition", "subject", "consumer", "stream_messages", "pending", "ack_pending", "redelivered", "delivered_sequence", "tool_cache_hits", "tool_cache_misses")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    STREAM_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ACK_PENDING_FIELD_NUMBER: _ClassVar[int]
    REDELIVERED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    partition: int
    subject: str
    consumer: str
    stream_messages: int
    pending: int
    ack_pending: int
    redelivered: int
    delivered_sequence: int
    tool_cache_hits: int
    tool_cache_misses: int
    def __init__(self, partition: _Optional[int] = ..., subject: _Optional[str] = ..., consumer: _Optional[str] = ..., stream_messages: _Optional[int] = ..., pending: _Optional[int] = ..., ack_pending: _Optional[int] = ..., redelivered: _Optional[int] = ..., delivered_sequence: _Optional[int] = ..., tool_cache_hits: _Optional[int] = ..., tool_cache_misses: _Optional[int] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("stream", "stream_messages", "stream_bytes", "last_sequence", "partitions", "replies_pending", "outbox_depth", "tool_cache_entries", "tool_cache_hits", "tool_cache_misses")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    STREAM_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    REPLIES_PENDING_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOOL_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOOL_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    stream: str
    stream_messages: int
    stream_bytes: int
    last_sequence: int
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionStats]
    replies_pending: int
    outbox_depth: int
    tool_cache_entries: int
    tool_cache_hits: int
    tool_cache_misses: int
    def __init__(self, stream: _Optional[str] = ..., stream_messages: _Optional[int] = ..., stream_bytes: _Optional[int] = ..., last_sequence: _Optional[int] = ..., partitions: _Optional[_Iterable[_Union[PartitionStats, _Mapping]]] = ..., replies_pending: _Optional[int] = ..., outbox_depth: _Optional[int] = ..., tool_cache_entries: _Optional[int] = ..., tool_cache_hits: _Optional[int] = ..., tool_cache_misses: _Optional[int] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("status", "dependencies", "replica")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Health.Status]
        STATUS_SERVING: _ClassVar[Health.Status]
        STATUS_NOT_SERVING: _ClassVar[Health.Status]
    STATUS_UNSPECIFIED: Health.Status
    STATUS_SERVING: Health.Status
    STATUS_NOT_SERVING: Health.Status
    class DependenciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Health.Status
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Health.Status, str]] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DEPENDENCIES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    status: Health.Status
    dependencies: _containers.ScalarMap[str, Health.Status]
    replica: str
    def __init__(self, status: _Optional[_Union[Health.Status, str]] = ..., dependencies: _Optional[_Mapping[str, Health.Status]] = ..., replica: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("version", "api_version", "commit")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    version: str
    api_version: str
    commit: str
    def __init__(self, version: _Optional[str] = ..., api_version: _Optional[str] = ..., commit: _Optional[str] = ...) -> None: ...
