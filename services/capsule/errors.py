"""Errors stored with an installation (code, message, reason) and back.

An install runs as a task, apart from the call that started it: its error is stored with the
installation, shown as `google.rpc.Status` in `Installation.error` and `InstallProgress.error`,
and raised again by every stream attached to it so that the call ends with that status.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import status_pb2

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SomaError,
    Unauthenticated,
    Unavailable,
)

_CLASSES: dict[int, type[SomaError]] = {
    cls.code.value[0]: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )
}


class Internal(SomaError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


@dataclass(frozen=True)
class Failure:
    """Why an install failed or was rejected."""

    code: int  # google.rpc.Code
    message: str
    reason: str

    @classmethod
    def of(cls, error: SomaError) -> Failure:
        return cls(int(error.code.value[0]), error.message, error.reason)

    def error(self) -> SomaError:
        """The domain error a stream raises to end its call with this status."""
        kind = _CLASSES.get(self.code, Internal)
        return kind(self.message, reason=self.reason or None)

    def status(self) -> status_pb2.Status:
        return self.error().to_status()


def status_of(code: int, message: str, reason: str) -> status_pb2.Status:
    return Failure(code, message, reason).status()
