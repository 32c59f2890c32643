"""Access tokens: ES256 JWTs signed by the OpenBao transit key `soma-jwt`.

The private key never leaves OpenBao: we build `base64url(header).base64url(claims)`, ask transit
to sign its SHA-256 (`marshaling_algorithm="jws"` returns the raw r||s signature JWS wants) with
a pinned key version, and use that version as the `kid` (`soma-jwt-v<N>`). Verifiers load the
public keys from `read_key` (services.common.vault.transit_public_keys), so a rotation adds a kid
and tokens signed by the previous version verify until they expire.

hvac is blocking: every OpenBao call runs in a thread. Calls made for a request go through
`vault.call` (OpenBao's circuit breaker, a wait bounded by the call's budget): with OpenBao
down or hung, IssueToken answers UNAVAILABLE within seconds, and at once while the breaker is
open; GetJwks keeps serving the last key set it read.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import hvac
from hvac import exceptions as hvac_errors

from services.common import vault
from services.common.auth.principal import Principal
from services.common.config import VaultConfig
from services.common.errors import Unavailable
from soma.keys.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
TOKEN_TYPE = "at+jwt"
KEY_TYPE = "ecdsa-p256"
JWKS_CACHE_SECONDS = 30.0
STALE_RETRY_SECONDS = 5.0  # while OpenBao is unavailable, how often GetJwks asks it again


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def build_claims(
    principal: Principal,
    *,
    issuer: str,
    audience: str,
    scopes: Iterable[str],
    now: int,
    ttl_seconds: int,
    jti: str | None = None,
) -> dict[str, Any]:
    """The token's claims: who (sub, tenant, roles, key), what (scope), for whom and how long."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": principal.subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": jti or uuid.uuid4().hex,
        "tenant": principal.tenant,
        "roles": sorted(principal.roles),
        "scope": " ".join(sorted(scopes)),
    }
    if principal.key_id:
        claims["key_id"] = principal.key_id
    if principal.owner:
        claims["owner"] = principal.owner
    return claims


def signing_input(header: dict[str, Any], claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return b64url(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())

    return f"{part(header)}.{part(claims)}"


def token_header(kid: str) -> dict[str, Any]:
    return {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid}


def parse_transit_signature(result: str) -> tuple[int, str]:
    """`vault:v<N>:<signature>` -> (N, base64url signature without padding)."""
    prefix, version, signature = result.split(":", 2)
    if prefix != "vault" or not version.startswith("v"):
        raise ValueError("unexpected transit signature format")
    # With marshaling_algorithm="jws" the signature is already base64url; drop any padding.
    return int(version[1:]), signature.rstrip("=")


def version_of(kid: str) -> int:
    return int(kid.rsplit("-v", 1)[1])


def jwk_message(jwk: dict[str, Any]) -> pb.JsonWebKey:
    """A JWK dict (as PyJWT's to_jwk writes it) as the contract's message; every field filled
    for EC keys, because Envoy prints default values."""
    return pb.JsonWebKey(
        kty=jwk["kty"],
        crv=jwk["crv"],
        x=jwk["x"],
        y=jwk.get("y", ""),
        kid=jwk["kid"],
        alg=jwk.get("alg", ALGORITHM),
        use=jwk.get("use", "sig"),
    )


def jwks_message(keys: dict[str, dict[str, Any]]) -> pb.JsonWebKeySet:
    """kid -> JWK, newest version first."""
    ordered = sorted(keys.values(), key=lambda k: version_of(k["kid"]), reverse=True)
    return pb.JsonWebKeySet(keys=[jwk_message(k) for k in ordered])


# -- OpenBao ------------------------------------------------------------------------------------


def _latest_version(c: hvac.Client, key_name: str) -> int | None:
    try:
        data = c.secrets.transit.read_key(name=key_name, mount_point=vault.TRANSIT_MOUNT)["data"]
    except hvac_errors.InvalidPath:
        return None
    return int(data["latest_version"])


def ensure_signing_key(
    config: VaultConfig, key_name: str = vault.JWT_KEY_NAME, seconds: float = vault.RETRY_SECONDS
) -> int:
    """Creates the transit key if missing (idempotent across replicas); returns its latest
    version. Gives OpenBao about `seconds` (retries included)."""
    c = vault.client(config, timeout=min(seconds, 10.0))

    def attempt() -> int:
        latest = _latest_version(c, key_name)
        if latest is not None:
            return latest
        c.secrets.transit.create_key(
            name=key_name, key_type=KEY_TYPE, mount_point=vault.TRANSIT_MOUNT
        )
        log.info("created transit key %s (%s)", key_name, KEY_TYPE)
        created = _latest_version(c, key_name)
        if created is None:
            raise vault.VaultUnavailable(f"transit key {key_name} vanished after creation")
        return created

    return vault.with_retry(attempt, f"ensure transit key {key_name}", seconds)


def rotate_signing_key(
    config: VaultConfig, key_name: str = vault.JWT_KEY_NAME, seconds: float = vault.RETRY_SECONDS
) -> str:
    """Adds a signing key version and returns its kid. Earlier versions stay in the JWKS (every
    version >= min_decryption_version), so tokens they signed verify until they expire."""
    c = vault.client(config, timeout=min(seconds, 10.0))

    def attempt() -> int:
        c.secrets.transit.rotate_key(name=key_name, mount_point=vault.TRANSIT_MOUNT)
        latest = _latest_version(c, key_name)
        if latest is None:
            raise vault.VaultUnavailable(f"transit key {key_name} does not exist")
        return latest

    version = vault.with_retry(attempt, f"rotate transit key {key_name}", seconds)
    log.info("rotated transit key %s to version %d", key_name, version)
    return vault.kid_for(version, key_name)


def _sign(c: hvac.Client, key_name: str, version: int, data: str) -> str:
    response = c.secrets.transit.sign_data(
        name=key_name,
        hash_input=base64.b64encode(data.encode()).decode(),
        key_version=version,
        hash_algorithm="sha2-256",
        marshaling_algorithm="jws",
        mount_point=vault.TRANSIT_MOUNT,
    )
    return str(response["data"]["signature"])


@dataclass
class _Cached:
    value: Any
    at: float


def _stale_stamp() -> float:
    """A cache time that makes the stale entry expire STALE_RETRY_SECONDS from now."""
    return time.monotonic() - JWKS_CACHE_SECONDS + STALE_RETRY_SECONDS


class TransitSigner:
    """Signs tokens and serves the JWKS; one per process. The signing version is refreshed
    with the JWKS, so a rotation made elsewhere (the admin command) is picked up within
    JWKS_CACHE_SECONDS; until then the previous version, still valid, keeps signing."""

    def __init__(self, config: VaultConfig, key_name: str = vault.JWT_KEY_NAME) -> None:
        self.config = config
        self.key_name = key_name
        # Request-path calls: each HTTP wait bounded like the call (SOMA_DEPENDENCY_TIMEOUT_MS).
        self._client = vault.client(config, timeout=vault.OPENBAO.timeout)
        self._version: int | None = None
        self._jwks: _Cached | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._version = await asyncio.to_thread(ensure_signing_key, self.config, self.key_name)

    async def jwks(self) -> dict[str, dict[str, Any]]:
        cached = self._jwks
        if cached is not None and time.monotonic() - cached.at < JWKS_CACHE_SECONDS:
            return dict(cached.value)
        async with self._lock:
            cached = self._jwks
            if cached is not None and time.monotonic() - cached.at < JWKS_CACHE_SECONDS:
                return dict(cached.value)
            try:
                keys = await vault.transit_public_keys_async(self.config, self.key_name)
            except Unavailable as error:
                if cached is None:
                    raise
                # Keys change only on rotation: the last set read is the best answer while
                # OpenBao is away. Asked again after STALE_RETRY_SECONDS, not on every call.
                log.warning("serving the last JWKS read: %s", error.message)
                self._jwks = _Cached(cached.value, _stale_stamp())
                return dict(cached.value)
            if keys:
                self._version = max(version_of(kid) for kid in keys)
            self._jwks = _Cached(keys, time.monotonic())
            return dict(keys)

    def forget(self) -> None:
        """Drops the cached JWKS and version (after a rotation in this process)."""
        self._jwks = None

    async def sign(self, claims: dict[str, Any]) -> tuple[str, str]:
        """Returns (compact JWT, kid)."""
        await self.jwks()  # refreshes the signing version when the cache is stale
        if self._version is None:
            self._version = await vault.call(
                lambda seconds: ensure_signing_key(self.config, self.key_name, seconds),
                f"ensure transit key {self.key_name}",
            )
        version = self._version
        kid = vault.kid_for(version, self.key_name)
        data = signing_input(token_header(kid), claims)
        what = f"sign with {self.key_name}"
        result = await vault.call(
            lambda seconds: vault.with_retry(
                lambda: _sign(self._client, self.key_name, version, data), what, seconds
            ),
            what,
        )
        signed_version, signature = parse_transit_signature(result)
        if signed_version != version:
            raise RuntimeError(f"transit signed with v{signed_version}, asked for v{version}")
        return f"{data}.{signature}", kid

    async def rotate(self) -> str:
        kid = await vault.call(
            lambda seconds: rotate_signing_key(self.config, self.key_name, seconds),
            f"rotate transit key {self.key_name}",
        )
        self._version = version_of(kid)
        self.forget()
        return kid
