"""Authorization: the Rego policy (policy/authz.rego) decides which callers may call a method.

`PolicyEngine` compiles the policy file once into a regopy bundle (a bundle query costs tens of
microseconds, a plain `query` ten times more) and caches decisions on their inputs: method,
roles and scopes are few, so nearly every call is a dictionary hit. The file is operator-edited:
its mtime is checked at most every `reload_interval` seconds, a changed file is recompiled and
the cache dropped; a file that no longer compiles is logged and the last good policy kept. At
start-up a broken file is a `PolicyError` naming it.

`AuthzInterceptor` runs after authentication (which sets `current_principal`); public methods
skip it. A denial is PERMISSION_DENIED with the policy's reason (ErrorInfo `POLICY_DENIED`).
The decision is left in `current_decision` for the audit interceptor inside it; a denial is
handed to the optional `on_deny` hook (the audit recorder) before the call is refused.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from services.common import metrics
from services.common.auth.principal import Principal, current_principal
from services.common.auth.public import is_public
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    wrap_handler,
)
from services.common.rego import PolicyError, RegoFile, defines_decision

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = Path(__file__).resolve().parents[3] / "policy" / "authz.rego"
ENTRYPOINT = "soma/authz/decision"  # data.soma.authz.decision
READ_PREFIXES = ("Get", "List", "Stream", "Tail", "Export", "Verify")
# A policy that reads the subject or tenant must not share decisions across them.
_READS_IDENTITY = re.compile(r"input\s*(?:\.\s*|\[\s*\")(?:subject|tenant)\b")


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str
    cached: bool = False


# The decision on the current call, for the audit interceptor (set by AuthzInterceptor).
current_decision: ContextVar[Decision | None] = ContextVar("current_decision", default=None)
# on_deny(method, principal, decision, context): records a denial before it is raised.
DenyHook = Callable[[str, Principal, Decision, aio.ServicerContext], Awaitable[None]]


def policy_file(environ: Mapping[str, str]) -> Path:
    """SOMA_POLICY_FILE, else the policy shipped in the repository."""
    return Path(environ.get("SOMA_POLICY_FILE") or DEFAULT_POLICY_FILE)


def split_method(method: str) -> tuple[str, str]:
    """`/soma.gateway.v1.GatewayService/GetSession` -> ("gateway", "GetSession")."""
    full_service, _, verb = method.lstrip("/").partition("/")
    parts = full_service.split(".")
    service = parts[1] if len(parts) >= 3 and parts[0] == "soma" else full_service
    return service, verb


def is_read(verb: str) -> bool:
    return verb.startswith(READ_PREFIXES)


def policy_input(principal: Principal, method: str) -> dict[str, Any]:
    service, verb = split_method(method)
    return {
        "subject": principal.subject,
        "tenant": principal.tenant,
        "roles": sorted(principal.roles),
        "scopes": sorted(principal.scopes),
        "method": method,
        "service": service,
        "verb": verb,
        "read": is_read(verb),
    }


def _check_decision_rule(path: Path, code: str) -> None:
    # regopy compiles a module without the entrypoint rule and then answers undefined for
    # every input (every call denied): refuse such a file instead.
    if not defines_decision(code, "soma.authz"):
        raise PolicyError(
            f"authorization policy {path} defines no decision: it must be `package soma.authz` "
            'with a rule `decision := {"allow": <bool>, "reason": <string>}`'
        )


def _decision(value: Any) -> Decision | None:
    """A well-formed decision from the policy's output, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("allow"), bool):
        return None
    return Decision(allow=value["allow"], reason=str(value.get("reason", "")))


class PolicyEngine:
    """The compiled policy plus a bounded LRU cache of its decisions."""

    def __init__(
        self,
        path: Path | str = DEFAULT_POLICY_FILE,
        *,
        cache_size: int = 4096,
        reload_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._file = RegoFile(
            self.path,
            ENTRYPOINT,
            what="authorization policy",
            check=_check_decision_rule,
            reload_interval=reload_interval,
            clock=clock,
            log=log,
        )
        self._reads_identity = bool(_READS_IDENTITY.search(self._file.compiled.code))
        self._cache: OrderedDict[tuple[Any, ...], Decision] = OrderedDict()
        self._cache_size = cache_size
        log.info("authorization policy loaded from %s", self.path)

    def decide(self, principal: Principal, method: str) -> Decision:
        if self._file.due():
            self.reload_if_changed()
        key: tuple[Any, ...] = (method, principal.roles, principal.scopes)
        if self._reads_identity:
            key += (principal.subject, principal.tenant)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        decision = self.evaluate(policy_input(principal, method))
        self._cache[key] = Decision(decision.allow, decision.reason, cached=True)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return decision

    def evaluate(self, data: Mapping[str, Any]) -> Decision:
        """Uncached: runs the policy on one input. Undefined or malformed output is a denial."""
        decision = _decision(self._file.query(data))
        if decision is None:
            return Decision(
                False,
                f"denied: the authorization policy gave no decision for {data.get('method')}",
            )
        return decision

    def reload_if_changed(self) -> bool:
        """Recompiles a changed file (keeping the last good policy if it is broken)."""
        reloaded = self._file.reload_if_changed()
        if reloaded:
            self._reads_identity = bool(_READS_IDENTITY.search(self._file.compiled.code))
            self._cache.clear()
        return reloaded

    def clear_cache(self) -> None:
        self._cache.clear()


class AuthzInterceptor(WrappingInterceptor):
    """Slot `authz` of build_interceptors: asks the policy before every non-public call."""

    def __init__(self, engine: PolicyEngine, on_deny: DenyHook | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.on_deny = on_deny

    def decide(self, method: str) -> tuple[Principal, Decision]:
        principal = current_principal.get()
        if principal is None:  # only if the authentication interceptor is missing
            raise Unauthenticated(
                "missing credentials: send authorization: Bearer <api key or token> or x-api-key",
                reason="CREDENTIALS_MISSING",
            )
        return principal, self.engine.decide(principal, method)

    def check(self, method: str) -> None:
        principal, decision = self.decide(method)
        if not decision.allow:
            raise self.denied(method, principal, decision)

    @staticmethod
    def denied(method: str, principal: Principal, decision: Decision) -> PermissionDenied:
        log.info("denied %s for %s: %s", method, principal.subject, decision.reason)
        return PermissionDenied(
            decision.reason, reason="POLICY_DENIED", metadata={"method": method}
        )

    async def _enter(self, method: str, context: aio.ServicerContext) -> Any:
        """Decides; on a denial records it (hook) and raises; else returns the var's token."""
        principal, decision = self.decide(method)
        metrics.cache_lookup("policy", decision.cached)
        metrics.auth_decision("allow" if decision.allow else "deny", principal.credential)
        if not decision.allow:
            if self.on_deny is not None:
                await self.on_deny(method, principal, decision, context)
            raise self.denied(method, principal, decision)
        return current_decision.set(decision)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if is_public(method):
            return handler
        enter = self._enter

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                token = await enter(method, context)
                try:
                    return await behavior(request, context)
                finally:
                    current_decision.reset(token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                token = await enter(method, context)
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
                            yield response
                finally:
                    with contextlib.suppress(ValueError):  # closed from another context
                        current_decision.reset(token)

            return call

        return wrap_handler(handler, around_unary, around_stream)
