"""Domain errors and their one mapping to `google.rpc.Status`.

    SomaError                      base: code + message + ErrorInfo reason
     ├── InvalidArgument           INVALID_ARGUMENT, with BadRequest field violations
     ├── NotFound                  NOT_FOUND
     ├── AlreadyExists             ALREADY_EXISTS
     ├── FailedPrecondition        FAILED_PRECONDITION
     ├── PermissionDenied          PERMISSION_DENIED
     ├── Unauthenticated           UNAUTHENTICATED
     ├── ResourceExhausted         RESOURCE_EXHAUSTED (optional retry delay)
     ├── Unavailable               UNAVAILABLE (a dependency is down; retry later)
     └── DeadlineExceeded          DEADLINE_EXCEEDED (the caller's deadline ran out first)

Handlers raise these; the error interceptor (services.common.interceptors) is the only place
that turns them into a gRPC status, so messages stay consistent across services.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "soma.dev"


class SomaError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )


class InvalidArgument(SomaError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        violations: Sequence[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations) or ([(field, message)] if field else [])

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        return details


class NotFound(SomaError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(SomaError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(SomaError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(SomaError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(SomaError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(SomaError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, retry_after_seconds: float | None = None, **kw: str
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        return details


class Unavailable(SomaError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(SomaError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


def internal_status(request_id: str) -> status_pb2.Status:
    """What a caller sees for a bug: no internals, but a request id to quote."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; quote request id {request_id} when reporting it",
    )


class OutOfRange(InvalidArgument):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"
