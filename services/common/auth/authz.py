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
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import regopy
from grpc import aio

from services.common.auth.principal import Principal, current_principal
from services.common.auth.public import is_public
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    wrap_handler,
)

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = Path(__file__).resolve().parents[3] / "policy" / "authz.rego"
ENTRYPOINT = "soma/authz/decision"  # data.soma.authz.decision
READ_PREFIXES = ("Get", "List", "Stream", "Tail", "Export", "Verify")
# A policy that reads the subject or tenant must not share decisions across them.
_READS_IDENTITY = re.compile(r"input\s*(?:\.\s*|\[\s*\")(?:subject|tenant)\b")
# regopy compiles a module without the entrypoint rule and then answers undefined for every
# input (every call denied): refuse such a file instead.
_PACKAGE = re.compile(r"^\s*package\s+soma\.authz\s*$", re.M)
_DECISION = re.compile(r"^\s*(?:default\s+)?decision\s*(?::=|=|if\b|\{)", re.M)


class PolicyError(Exception):
    """The policy file cannot be used (missing, does not compile, no decision rule)."""


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


@dataclass(frozen=True)
class _Compiled:
    interpreter: regopy.Interpreter
    bundle: regopy.Bundle
    signature: tuple[int, int]  # (mtime_ns, size) of the file it came from
    reads_identity: bool


def _signature(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _query(compiled: _Compiled, data: Mapping[str, Any]) -> Decision | None:
    """One evaluation; None when the policy gives no well-formed decision (undefined)."""
    compiled.interpreter.set_input(dict(data))
    try:
        output = compiled.interpreter.query_bundle_entrypoint(compiled.bundle, ENTRYPOINT)
    except (regopy.RegoError, ValueError) as error:
        # ValueError: regopy could not parse the engine's output as JSON (rego-cpp leaves
        # quotes inside strings unescaped, e.g. a scope containing `"`).
        log.warning("authorization policy evaluation failed: %s", error)
        return None
    if not output.ok() or not output.results or not output.results[0].expressions:
        return None
    value = output.results[0].expressions[0]
    if not isinstance(value, dict) or not isinstance(value.get("allow"), bool):
        return None
    return Decision(allow=value["allow"], reason=str(value.get("reason", "")))


def compile_policy(path: Path) -> _Compiled:
    """Reads and compiles the policy; raises PolicyError naming the file on any problem."""
    try:
        signature = _signature(path)
        source = path.read_text()
    except OSError as error:
        raise PolicyError(f"authorization policy {path}: cannot read it: {error}") from error
    interpreter = regopy.Interpreter()
    try:
        interpreter.add_module(str(path), source)
        bundle = interpreter.build(None, [ENTRYPOINT])
    except regopy.RegoError as error:
        raise PolicyError(f"authorization policy {path} does not compile: {error}") from error
    if not bundle.ok():
        raise PolicyError(f"authorization policy {path} does not compile: {bundle.node}")
    code = re.sub(r"#.*", "", source)  # comments may mention input.subject harmlessly
    if not (_PACKAGE.search(code) and _DECISION.search(code)):
        raise PolicyError(
            f"authorization policy {path} defines no decision: it must be `package soma.authz` "
            'with a rule `decision := {"allow": <bool>, "reason": <string>}`'
        )
    return _Compiled(interpreter, bundle, signature, bool(_READS_IDENTITY.search(code)))


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
        self._compiled = compile_policy(self.path)
        self._cache: OrderedDict[tuple[Any, ...], Decision] = OrderedDict()
        self._cache_size = cache_size
        self._reload_interval = reload_interval
        self._clock = clock
        self._next_check = clock() + reload_interval
        self._failed_signature: tuple[int, int] | None = None
        self._lock = threading.Lock()  # regopy's interpreter holds the input: one query at a time
        log.info("authorization policy loaded from %s", self.path)

    def decide(self, principal: Principal, method: str) -> Decision:
        if self._clock() >= self._next_check:
            self.reload_if_changed()
        key: tuple[Any, ...] = (method, principal.roles, principal.scopes)
        if self._compiled.reads_identity:
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
        with self._lock:
            decision = _query(self._compiled, data)
        if decision is None:
            return Decision(
                False,
                f"denied: the authorization policy gave no decision for {data.get('method')}",
            )
        return decision

    def reload_if_changed(self) -> bool:
        """Recompiles a changed file (keeping the last good policy if it is broken)."""
        self._next_check = self._clock() + self._reload_interval
        try:
            signature = _signature(self.path)
        except OSError as error:
            if self._failed_signature != (-1, -1):
                log.error(
                    "authorization policy %s: %s; keeping the last good policy", self.path, error
                )
                self._failed_signature = (-1, -1)
            return False
        if signature in (self._compiled.signature, self._failed_signature):
            return False
        try:
            compiled = compile_policy(self.path)
        except PolicyError as error:
            log.error("%s; keeping the last good policy", error)
            self._failed_signature = signature
            return False
        with self._lock:
            self._compiled = compiled
            self._cache.clear()
        self._failed_signature = None
        log.info("authorization policy reloaded from %s", self.path)
        return True

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
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                token = await enter(method, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    with contextlib.suppress(ValueError):  # closed from another context
                        current_decision.reset(token)

            return call

        return wrap_handler(handler, around_unary, around_stream)
