"""Client interceptors: credentials on every call, a default deadline on unary calls.

Interceptors rather than `grpc.metadata_call_credentials`, because call credentials need a TLS
channel and the local mesh's Envoy listener speaks h2c.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc


def _details(
    details: grpc.aio.ClientCallDetails,
    extra: Sequence[tuple[str, str]],
    default_timeout: float | None,
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in extra:
        if key not in metadata:  # a credential given for one call wins over the client's
            metadata.add(key, value)
    timeout = details.timeout if details.timeout is not None else default_timeout
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class _Base:
    def __init__(self, metadata: Sequence[tuple[str, str]], default_timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._timeout = default_timeout


class UnaryUnary(_Base, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(
            _details(client_call_details, self._metadata, self._timeout), request
        )


class UnaryStream(_Base, grpc.aio.UnaryStreamClientInterceptor):
    # Streams (StreamEvents) are long-lived: no default deadline, only credentials.
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_details(client_call_details, self._metadata, None), request)


class StreamUnary(_Base, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(
            _details(client_call_details, self._metadata, None), request_iterator
        )


class StreamStream(_Base, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(
            _details(client_call_details, self._metadata, None), request_iterator
        )


def interceptors(
    metadata: Sequence[tuple[str, str]], default_timeout: float | None
) -> list[grpc.aio.ClientInterceptor]:
    return [
        UnaryUnary(metadata, default_timeout),
        UnaryStream(metadata, default_timeout),
        StreamUnary(metadata, default_timeout),
        StreamStream(metadata, default_timeout),
    ]
