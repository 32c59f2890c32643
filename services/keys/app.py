"""Wires the Keys service together: the auth + keys migrations, OpenBao, the servicer."""

from __future__ import annotations

from grpc import aio

from services.common.auth.migrations import AUTH_MIGRATIONS
from services.common.config import Config, ConfigError, VaultConfig
from services.common.db import migrate
from services.common.runtime import Runtime
from services.common.server import ServiceParts
from services.common.vault import load_pepper_async
from services.keys.directory import Directory
from services.keys.servicer import KeysServicer
from services.keys.store import MIGRATIONS, KeyStore
from services.keys.tokens import TransitSigner
from soma.keys.v1 import keys_pb2_grpc

SERVICE_NAME = "soma.keys.v1.KeysService"


def require_vault(config: Config) -> VaultConfig:
    if config.vault is None:
        raise ConfigError(
            "keys needs VAULT_ADDR and VAULT_TOKEN (OpenBao holds the API key pepper and the "
            "token signing key)"
        )
    return config.vault


async def open_keys(runtime: Runtime, signer: TransitSigner | None = None) -> ServiceParts:
    """`signer` (tests) replaces the OpenBao transit signer built from the config."""
    vault = require_vault(runtime.config)
    settings = runtime.auth.settings
    async with runtime.pool.acquire() as conn:
        await migrate(conn, "auth", AUTH_MIGRATIONS)
        await migrate(conn, "keys", MIGRATIONS)  # after auth: it extends auth_role_bindings
    signer = signer or TransitSigner(vault)
    await signer.start()  # creates the signing key on a fresh OpenBao
    keys = KeyStore(runtime.pool)
    await keys.prune_requests()
    servicer = KeysServicer(
        keys,
        Directory(runtime.pool),
        runtime.bus,
        signer,
        pepper=await load_pepper_async(vault),
        env=settings.env,
        issuer=settings.jwt_issuer,
        audiences=(settings.jwt_audience,),
        # IssueToken checks the key it exchanges the way every call is checked (state,
        # expiry, budget and rate limit).
        verify_api_key=runtime.auth.verify_api_key,
    )

    def register(server: aio.Server) -> None:
        keys_pb2_grpc.add_KeysServiceServicer_to_server(servicer, server)

    async def close() -> None:
        pass  # the pool and the NATS connection belong to the runtime

    return ServiceParts([SERVICE_NAME], register, close)
