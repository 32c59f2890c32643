"""Authentication settings, read once at start from an environment mapping.

| variable                    | default    | meaning                                          |
|-----------------------------|------------|--------------------------------------------------|
| SOMA_ENV                    | dev        | live, test or dev: the env part of new API keys  |
| SOMA_JWT_ISSUER             | soma-mesh  | `iss` of tokens the Keys service issues          |
| SOMA_JWT_AUDIENCE           | soma-mesh  | `aud` every token must contain                   |
| SOMA_JWT_LEEWAY_SECONDS     | 30         | clock skew allowed on exp/nbf/iat                |
| SOMA_KEY_CACHE_TTL_SECONDS  | 60         | backstop TTL of cached keys (NATS drops earlier) |
| SOMA_LAST_USED_FLUSH_SECONDS| 5          | how often last_used_time is written, in batches  |
| SOMA_OIDC_ISSUER            | (none)     | an external OIDC issuer whose tokens are accepted|
| SOMA_OIDC_JWKS_URL          | (none)     | its JWKS (required with SOMA_OIDC_ISSUER)        |
| SOMA_OIDC_AUDIENCE          | = SOMA_JWT_AUDIENCE | `aud` required in OIDC tokens           |
| SOMA_OIDC_TENANT_CLAIM      | tenant     | claim naming the caller's tenant                 |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.apikeys import ENVS
from services.common.config import ConfigError
from services.common.envparse import non_negative_float


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    jwks_url: str
    audience: str
    tenant_claim: str = "tenant"


@dataclass(frozen=True)
class AuthConfig:
    env: str = "dev"
    jwt_issuer: str = "soma-mesh"
    jwt_audience: str = "soma-mesh"
    jwt_leeway_seconds: float = 30.0
    key_cache_ttl_seconds: float = 60.0
    last_used_flush_seconds: float = 5.0
    jwks_reload_min_seconds: float = 10.0
    oidc: OidcConfig | None = None


def load_auth_config(env: Mapping[str, str]) -> AuthConfig:
    soma_env = env.get("SOMA_ENV", "dev").strip().lower() or "dev"
    if soma_env not in ENVS:
        raise ConfigError(f"SOMA_ENV={soma_env!r}: use {', '.join(ENVS)}")
    audience = env.get("SOMA_JWT_AUDIENCE", "").strip() or "soma-mesh"
    oidc_issuer = env.get("SOMA_OIDC_ISSUER", "").strip()
    oidc_jwks = env.get("SOMA_OIDC_JWKS_URL", "").strip()
    if bool(oidc_issuer) != bool(oidc_jwks):
        raise ConfigError("SOMA_OIDC_ISSUER and SOMA_OIDC_JWKS_URL go together: set both or none")
    oidc = (
        OidcConfig(
            issuer=oidc_issuer,
            jwks_url=oidc_jwks,
            audience=env.get("SOMA_OIDC_AUDIENCE", "").strip() or audience,
            tenant_claim=env.get("SOMA_OIDC_TENANT_CLAIM", "").strip() or "tenant",
        )
        if oidc_issuer
        else None
    )
    return AuthConfig(
        env=soma_env,
        jwt_issuer=env.get("SOMA_JWT_ISSUER", "").strip() or "soma-mesh",
        jwt_audience=audience,
        jwt_leeway_seconds=non_negative_float(env, "SOMA_JWT_LEEWAY_SECONDS", 30.0),
        key_cache_ttl_seconds=non_negative_float(env, "SOMA_KEY_CACHE_TTL_SECONDS", 60.0),
        last_used_flush_seconds=non_negative_float(env, "SOMA_LAST_USED_FLUSH_SECONDS", 5.0),
        oidc=oidc,
    )
