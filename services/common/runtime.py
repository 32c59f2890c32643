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

from services.common.auth.authn import Authenticator, AuthnInterceptor
from services.common.auth.authz import AuthzInterceptor, PolicyEngine, policy_file
from services.common.auth.settings import load_auth_config
from services.common.config import Config, require_database
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

    def interceptors(self) -> Sequence[aio.ServerInterceptor]:
        return build_interceptors(
            authn=AuthnInterceptor(self.auth), authz=AuthzInterceptor(self.policy)
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.auth.close()
        await self.bus.close()
        await self.pool.close()


async def open_runtime(config: Config, env: Mapping[str, str], draining: asyncio.Event) -> Runtime:
    database = require_database(config)
    policy = PolicyEngine(policy_file(env))  # a broken policy stops the start, naming the file
    pool = await asyncpg.create_pool(database.url, min_size=1, max_size=database.pool_max)
    try:
        bus = await connect(config.nats, config.server.replica)
        try:
            auth = await Authenticator.open(config, pool, bus, load_auth_config(env))
        except BaseException:
            await bus.close()
            raise
    except BaseException:
        await pool.close()
        raise
    return Runtime(config, draining, pool, bus, auth, policy)
