"""What every service process shares: PostgreSQL, NATS, authentication and authorization.

Opened once at start by `services.common.server.serve`, before the service's own resources,
so that every server — including those whose methods are still UNIMPLEMENTED — authenticates
and authorizes each call before any handler answers (deny by default).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
from grpc import aio

from services.common import dependency
from services.common.audit.interceptor import AuditHooks, AuditInterceptor
from services.common.audit.recorder import AuditRecorder
from services.common.audit.settings import load_audit_config
from services.common.auth.authn import Authenticator, AuthnInterceptor
from services.common.auth.authz import AuthzInterceptor, PolicyEngine, policy_file
from services.common.auth.settings import load_auth_config
from services.common.config import Config, require_database
from services.common.db import GuardedPool, create_pool
from services.common.events import Bus, connect
from services.common.interceptors import build_interceptors


@dataclass
class Runtime:
    config: Config
    draining: asyncio.Event  # set on SIGTERM: long streams end so the replica can drain
    pool: asyncpg.Pool
    bus: Bus
    auth: Authenticator
    policy: PolicyEngine
    audit: AuditRecorder | None = None  # None when SOMA_AUDIT=off

    def serving(self) -> None:
        """Start-up (migrations) is done: from now on every unit of work on PostgreSQL is
        bounded (services.common.db.GuardedPool)."""
        if isinstance(self.pool, GuardedPool):
            self.pool.bound()

    def interceptors(self) -> Sequence[aio.ServerInterceptor]:
        if self.audit is None:
            return build_interceptors(
                authn=AuthnInterceptor(self.auth), authz=AuthzInterceptor(self.policy)
            )
        hooks = AuditHooks(self.audit)
        return build_interceptors(
            authn=AuthnInterceptor(self.auth, on_failure=hooks.unauthenticated),
            authz=AuthzInterceptor(self.policy, on_deny=hooks.denied),
            audit=AuditInterceptor(self.audit),
        )

    async def close(self) -> None:
        if self.audit is not None:  # before the bus: in-flight events finish or stay in the outbox
            with contextlib.suppress(Exception):
                await self.audit.close()
        with contextlib.suppress(Exception):
            await self.auth.close()
        await self.bus.close()
        await self.pool.close()


async def open_runtime(config: Config, env: Mapping[str, str], draining: asyncio.Event) -> Runtime:
    database = require_database(config)
    policy = PolicyEngine(policy_file(env))  # a broken policy stops the start, naming the file
    audit_config = load_audit_config(env)
    dependency.configure(env)  # SOMA_DEPENDENCY_TIMEOUT_MS
    pool = await create_pool(database)
    try:
        bus = await connect(config.nats, config.server.replica)
        try:
            audit = (
                await AuditRecorder.open(bus, audit_config, config.server.replica)
                if audit_config.enabled
                else None
            )
            try:
                auth = await Authenticator.open(config, pool, bus, load_auth_config(env))
            except BaseException:
                if audit is not None:
                    await audit.close()
                raise
        except BaseException:
            await bus.close()
            raise
    except BaseException:
        await pool.close()
        raise
    return Runtime(config, draining, pool, bus, auth, policy, audit)
