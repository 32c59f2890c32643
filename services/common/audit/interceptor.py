"""The `audit` interceptor slot, and the hooks authn/authz call to record their refusals.

One event per audited call:
* refused by authentication (non-public method) -> DENY, recorded by `AuditHooks.unauthenticated`
  (wired as AuthnInterceptor's `on_failure`);
* denied by the policy -> DENY, recorded by `AuditHooks.denied` (AuthzInterceptor's `on_deny`);
  the audit interceptor inside never runs then;
* allowed mutation -> the fail-closed gate runs before the handler, then ONE event with decision
  ALLOW (DENY if the handler itself refused: UNAUTHENTICATED / PERMISSION_DENIED), the final
  status code and the resource, awaited until durable (JetStream ack or outbox fsync);
* allowed read -> sampled (SOMA_AUDIT_READ_SAMPLE), recorded in the background; a read the
  handler refused is never sampled out.
Public methods are not audited, except IssueToken (a credential exchange; never gated).

Handlers may add to their call's event with `annotate(resource=..., tenant=..., principal=...,
**detail)` (e.g. IssueToken names the key it verified; a create names its new resource).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from services.common.audit.event import (
    CallInfo,
    build_event,
    call_info,
    clean_value,
    request_detail,
    resource_of,
    tenant_of,
)
from services.common.audit.recorder import AuditRecorder
from services.common.audit.settings import AuditConfig
from services.common.auth.authz import Decision, current_decision, is_read, split_method
from services.common.auth.principal import Principal, current_principal
from services.common.auth.public import is_public
from services.common.errors import SomaError, Unauthenticated
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    wrap_handler,
)
from services.common.logs import request_id_var
from soma.audit.v1 import resources_pb2 as pb

AUDITED_PUBLIC = frozenset({"/soma.keys.v1.KeysService/IssueToken"})
_DENIAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class Annotation:
    resource: str = ""
    tenant: str | None = None
    principal: Principal | None = None
    detail: dict[str, object] = field(default_factory=dict)


_annotation: ContextVar[Annotation | None] = ContextVar("audit_annotation", default=None)


def annotate(
    *,
    resource: str = "",
    tenant: str | None = None,
    principal: Principal | None = None,
    **detail: object,
) -> None:
    """Adds to the current call's audit event (no-op outside an audited call)."""
    note = _annotation.get()
    if note is None:
        return
    if resource:
        note.resource = resource
    if tenant is not None:
        note.tenant = tenant
    if principal is not None:
        note.principal = principal
    note.detail.update(detail)


def _context_info(context: aio.ServicerContext) -> CallInfo:
    request_id = request_id_var.get()
    return call_info(
        context.invocation_metadata() or (),
        context.peer(),
        "" if request_id == "-" else request_id,
    )


class AuditHooks:
    """Records authn and authz refusals (awaited: durable before the caller hears no)."""

    def __init__(self, recorder: AuditRecorder) -> None:
        self.recorder = recorder

    async def denied(
        self, method: str, principal: Principal, decision: Decision, context: aio.ServicerContext
    ) -> None:
        event = build_event(
            method=method,
            principal=principal,
            allow=False,
            reason=decision.reason,
            status_code=grpc.StatusCode.PERMISSION_DENIED,
            call=_context_info(context),
            detail={"reason": "POLICY_DENIED"},
        )
        await self.recorder.record(event)

    async def unauthenticated(
        self, method: str, error: Unauthenticated, context: aio.ServicerContext
    ) -> None:
        event = build_event(
            method=method,
            principal=None,
            allow=False,
            reason=error.message,
            status_code=grpc.StatusCode.UNAUTHENTICATED,
            call=_context_info(context),
            detail={"reason": error.reason},
        )
        await self.recorder.record(event)


def _outcome(error: BaseException | None, context: aio.ServicerContext) -> grpc.StatusCode:
    if error is None or isinstance(error, aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(error, SomaError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class AuditInterceptor(WrappingInterceptor):
    """Slot `audit` of build_interceptors (inside authz, so the decision is known)."""

    def __init__(
        self,
        recorder: AuditRecorder,
        config: AuditConfig | None = None,
        public: Callable[[str], bool] = is_public,
        sample: Callable[[], float] = random.random,
    ) -> None:
        super().__init__()
        self.recorder = recorder
        self.config = config or recorder.config
        self._public = public
        self._sample = sample

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        public = self._public(method)
        if public and method not in AUDITED_PUBLIC:
            return handler
        read = is_read(split_method(method)[1])
        gated = not read and not public
        recorder, rate, sample = self.recorder, self.config.read_sample, self._sample

        def finish(
            request: Any,
            response: Any,
            error: BaseException | None,
            context: aio.ServicerContext,
            note: Annotation,
        ) -> pb.AuditEvent | None:
            code = _outcome(error, context)
            refused = code in _DENIAL_CODES
            if read and not refused and rate < 1.0 and sample() >= rate:
                return None
            principal = note.principal or current_principal.get()
            decision = current_decision.get()
            if refused:
                reason = error.message if isinstance(error, SomaError) else code.name
            else:
                reason = decision.reason if decision else "public method"
            detail: dict[str, object] = dict(request_detail(request))
            detail.update(note.detail)
            if isinstance(error, SomaError):
                detail["error_reason"] = error.reason
            if read and rate < 1.0 and not refused:
                detail["sampled"] = str(rate)
            resource = note.resource or resource_of(request, response)
            call = _context_info(context)
            field_id = getattr(request, "request_id", None)  # the request's own id wins
            if isinstance(field_id, str) and field_id:
                call = dataclasses.replace(call, request_id=clean_value(field_id))
            return build_event(
                method=method,
                principal=principal,
                allow=not refused,
                reason=reason,
                status_code=code,
                call=call,
                resource=resource,
                tenant=tenant_of(resource, response, principal)
                if note.tenant is None
                else note.tenant,
                detail=detail,
            )

        async def settle(event: pb.AuditEvent | None, error: BaseException | None) -> None:
            if event is None:
                return
            if read or isinstance(error, asyncio.CancelledError):
                recorder.record_nowait(event)  # reads never wait; a cancelled call cannot
            else:
                await recorder.record(event)

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                note = Annotation()
                token = _annotation.set(note)
                response: Any = None
                error: BaseException | None = None
                try:
                    if gated:
                        await recorder.ensure_durable()
                    response = await behavior(request, context)
                    return response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    _annotation.reset(token)
                    await settle(finish(request, response, error, context, note), error)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                note = Annotation()
                token = _annotation.set(note)
                error: BaseException | None = None
                try:
                    if gated:
                        await recorder.ensure_durable()
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
                            yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    try:
                        _annotation.reset(token)
                    except ValueError:  # closed from another context
                        pass
                    event = finish(request, None, error, context, note)
                    if event is not None:
                        recorder.record_nowait(event)  # a generator may be closing: no await

            return call

        return wrap_handler(handler, around_unary, around_stream)
