"""Server interceptors, and the order they run in.

Every call passes, outermost first:

    telemetry -> errors -> authn -> authz -> audit -> handler

* telemetry: request id (from Envoy's `x-request-id` or a new one) into the logging context,
  one log line per call with method, status code and duration.
* errors: the only place domain errors (services.common.errors) become a gRPC status with
  `google.rpc.Status` details; anything unexpected becomes INTERNAL with the request id and
  never leaks internals to the caller.
* authn, authz, audit: slots filled by the Keys and Audit issues (see `build_interceptors`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from services.common.errors import SomaError, internal_status
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

UnaryBehavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]


def _metadata(context: aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value if isinstance(item.value, str) else item.value.decode()
    return None


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    around_unary: Callable[[UnaryBehavior], UnaryBehavior],
    around_stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    """Returns `handler` with its behaviour wrapped, for any of the four call shapes."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around_unary(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(around_unary(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around_stream(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(around_stream(handler.stream_stream), **kwargs)


class WrappingInterceptor(aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once and reuses the wrapper: building
    handler objects on every call cost measurable throughput."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class TelemetryInterceptor(WrappingInterceptor):
    """Request id in every log line of the call, and one access line per call."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:

        def start(context: aio.ServicerContext) -> tuple[float, Any]:
            request_id = _metadata(context, "x-request-id") or uuid.uuid4().hex
            return time.perf_counter(), request_id_var.set(request_id)

        def finish(context: aio.ServicerContext, started: float, token: Any) -> None:
            code = context.code() or grpc.StatusCode.OK
            code_name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if code_name in {"INTERNAL", "UNKNOWN"}:
                level = logging.WARNING
            elif method.startswith(QUIET_PREFIXES):
                level = logging.DEBUG  # probed every second by Envoy and the supervisor
            else:
                level = logging.INFO
            log.log(level, "%s %s %.1fms", method, code_name, elapsed_ms)
            request_id_var.reset(token)

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                started, token = start(context)
                try:
                    return await behavior(request, context)
                finally:
                    finish(context, started, token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started, token = start(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    finish(context, started, token)

            return call

        return wrap_handler(handler, around_unary, around_stream)


async def _abort(context: aio.ServicerContext, error: BaseException) -> None:
    if isinstance(error, SomaError):
        status = error.to_status()
    else:
        log.exception("unhandled error", exc_info=error)
        status = internal_status(request_id_var.get())
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    await context.abort(
        code, status.message, trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),)
    )


class ErrorInterceptor(WrappingInterceptor):
    """Maps domain errors (and bugs) to a gRPC status with `google.rpc.Status` details."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except aio.AbortError:
                    raise
                except Exception as error:
                    await _abort(context, error)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(request, context):
                        yield response
                except aio.AbortError:
                    raise
                except Exception as error:
                    await _abort(context, error)

            return call

        return wrap_handler(handler, around_unary, around_stream)


def build_interceptors(
    authn: aio.ServerInterceptor | None = None,
    authz: aio.ServerInterceptor | None = None,
    audit: aio.ServerInterceptor | None = None,
) -> Sequence[aio.ServerInterceptor]:
    """The interceptor chain in its fixed order; empty slots are skipped (not faked)."""
    chain: list[aio.ServerInterceptor | None] = [
        TelemetryInterceptor(),
        ErrorInterceptor(),
        authn,
        authz,
        audit,
    ]
    return [i for i in chain if i is not None]
