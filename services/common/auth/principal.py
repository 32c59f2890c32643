"""Who is calling: set by the authentication interceptor, read by authorization and handlers."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from services.common.errors import Unauthenticated

ROLES = ("platform_admin", "admin", "member", "approver", "auditor")


@dataclass(frozen=True)
class Principal:
    subject: str  # "key:<key id>" for API keys and tokens issued from them; "user:<sub>" for OIDC
    tenant: str  # tenant id, e.g. "acme"
    roles: frozenset[str]
    scopes: frozenset[str]  # e.g. {"*"} or {"gateway:read", "gateway:write"}
    credential: str  # "api_key" | "jwt"
    key_id: str | None = None  # the API key behind the call (never the secret)
    token_kid: str | None = None  # kid of the JWT, when the call used one
    owner: str | None = None  # who owns the key, e.g. "user:alice" or "key:<id>"


current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)


def require_principal() -> Principal:
    principal = current_principal.get()
    if principal is None:
        # Only reachable if a non-public method ran without the authentication interceptor.
        raise Unauthenticated(
            "missing credentials: send authorization: Bearer <api key or token> or x-api-key",
            reason="CREDENTIALS_MISSING",
        )
    return principal
