"""Server interceptors, and the order they run in.

Every call passes, outermost first:

    [stream owner -> tracing -> metrics ->] telemetry -> errors -> authn -> authz -> audit
      -> handler

* stream owner, tracing, metrics: added by services.common.server.create_server. The owner:
  a streaming call's responses are written by a coroutine that closes the chain of generators
  in the call's own task, however the call ends (see `StreamOwnerInterceptor`).

* telemetry: request id (from Envoy's `x-request-id` or a new one) into the logging context,
  the caller's deadline into services.common.deadline (it bounds the call's waits on
  PostgreSQL, NATS and OpenBao), one log line per call with method, status code and duration.
* errors: the only place domain errors (services.common.errors) become a gRPC status with
  `google.rpc.Status` details; anything unexpected becomes INTERNAL with the request id and
  never leaks internals to the caller.
* authn, authz, audit: slots filled by the Keys and Audit issues (see `build_interceptors`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from services.common import deadline
from services.common.errors import SomaError, internal_status
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

UnaryBehavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, aio.ServicerContext], AsyncGenerator[Any, None]]


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


class StreamOwnerInterceptor(WrappingInterceptor):
    """Outermost: serves a streaming handler's responses itself, and closes the chain of
    generators in the call's own task.

    Given an async generator, grpc.aio iterates it and writes each response; when a write fails
    (the client cancelled, the call ended) it leaves the generator suspended at its `yield` and
    never closes it. Python then closes it when it is collected, from a new task in a *copy* of
    the call's context: every `finally` of the interceptor chain runs there, where
    `ContextVar.reset(token)` raises ValueError (our request id, the deadline) and OpenTelemetry
    logs "Failed to detach context" for the server span; and it runs after grpc is done with
    the call, where `context.peer()` (the audit event's) crashed the process with SIGSEGV.
    Given a coroutine (grpc's reader/writer API), grpc just awaits it: this one writes the
    responses and, however it ends, `aclose`s the chain before returning. Each layer of the
    chain closes the generator it iterates in turn (`contextlib.aclosing`: `async for` does
    not), so every `finally` runs in the call's task and context."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if not handler.response_streaming:
            return handler  # a coroutine already: awaited in the call's task

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> None:
                responses: Any = behavior(request, context)
                if not hasattr(responses, "__aiter__"):  # a reader/writer handler
                    await responses
                    return
                try:
                    async for response in responses:
                        await context.write(response)
                finally:
                    await responses.aclose()

            return call  # type: ignore[return-value]

        return wrap_handler(handler, lambda behavior: behavior, around_stream)


class TelemetryInterceptor(WrappingInterceptor):
    """Request id in every log line of the call, and one access line per call."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:

        def start(context: aio.ServicerContext) -> tuple[float, Any]:
            request_id = _metadata(context, "x-request-id") or uuid.uuid4().hex
            return time.perf_counter(), (request_id_var.set(request_id), deadline.begin(context))

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
            request_id_var.reset(token[0])
            deadline.end(token[1])

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                started, token = start(context)
                try:
                    return await behavior(request, context)
                finally:
                    finish(context, started, token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                started, token = start(context)
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
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
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
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
