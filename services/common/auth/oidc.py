"""An optional external OIDC issuer (SOMA_OIDC_ISSUER + SOMA_OIDC_JWKS_URL).

Its tokens authenticate `user:<sub>`; the tenant comes from a claim (SOMA_OIDC_TENANT_CLAIM)
and the roles from relationship tuples in auth_role_bindings (`user:<sub> <role> tenant:<t>`,
plus `user:<sub> admin platform:soma` for platform_admin), cached briefly.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Mapping
from typing import Any

import asyncpg

from services.common.auth.jwt_verify import JwtVerifier, KeySet, invalid
from services.common.auth.principal import Principal
from services.common.auth.relations import RelationStore
from services.common.auth.settings import OidcConfig

ROLES_TTL_SECONDS = 10.0


def http_jwks(url: str) -> Any:
    """A JWKS source reading `url` (blocking work in a thread)."""

    def fetch() -> dict[str, Mapping[str, Any]]:
        with urllib.request.urlopen(url, timeout=5) as response:  # the operator-configured JWKS URL
            document = json.load(response)
        return {k["kid"]: k for k in document.get("keys", []) if isinstance(k.get("kid"), str)}

    async def source() -> dict[str, Mapping[str, Any]]:
        return await asyncio.to_thread(fetch)

    return source


class OidcAuthenticator:
    def __init__(self, config: OidcConfig, pool: asyncpg.Pool, leeway: float) -> None:
        self.config = config
        self._pool = pool
        keys = KeySet(http_jwks(config.jwks_url), allowed_algs=("ES256", "RS256", "PS256"))
        # ID-token style `typ: JWT` or none is common among providers: not pinned here.
        self.verifier = JwtVerifier(keys, config.issuer, config.audience, leeway, types=None)
        self._relations = RelationStore(pool, ttl=ROLES_TTL_SECONDS)

    async def roles_of(self, subject: str, tenant: str) -> frozenset[str]:
        # One reading of the relationship tuples for the whole mesh: the RelationStore's.
        return await self._relations.roles_of(subject, tenant)

    def forget(self) -> None:
        self._relations.invalidate()

    async def verify(self, token: str) -> Principal:
        claims, kid = await self.verifier.verify(token)
        tenant = claims.get(self.config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise invalid(f"token has no {self.config.tenant_claim} claim")
        subject = f"user:{claims['sub']}"
        return Principal(
            subject=subject,
            tenant=tenant,
            roles=await self.roles_of(subject, tenant),
            scopes=frozenset({"*"}),
            credential="jwt",
            token_kid=kid,
            owner=subject,
        )
