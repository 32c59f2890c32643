"""Errors of the SDK, and the redaction that keeps credentials out of every message.

    ApiError           a call failed: `code` (grpc.StatusCode), `message`, `reason` (ErrorInfo)

Messages are redacted before they are stored: anything shaped like an API key or a JWT, and
the exact credentials the client holds, become `[redacted]`. A server never echoes a secret,
but a proxy or a future bug might; the CLI prints these messages, so it is checked here once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc
from google.rpc import error_details_pb2, status_pb2

REDACTED = "[redacted]"
# An API key (any env, even a mangled one) or a compact JWS (header.payload.signature).
_SECRET_SHAPES = re.compile(
    r"soma_[A-Za-z0-9_]{8,}"
    r"|eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


class ApiError(Exception):
    """A failed call: the gRPC code, the server's message and its ErrorInfo reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})

    @classmethod
    def from_rpc_error(
        cls, error: grpc.aio.AioRpcError, secrets: Iterable[str | None] = ()
    ) -> ApiError:
        held = list(secrets)
        reason, metadata = _error_info(error)
        return cls(
            error.code(),
            redact(error.details() or "", held),
            reason,
            {k: redact(v, held) for k, v in metadata.items()},
        )


def _error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """ErrorInfo from the `grpc-status-details-bin` trailer, if the server sent one."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer must not hide the real error
            return "", {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason, dict(info.metadata)
    return "", {}
