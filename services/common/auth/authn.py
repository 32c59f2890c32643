"""Authentication: who is calling, for every service.

`Authenticator` (one per process, `await Authenticator.open(config, pool, bus)`) turns a
credential into a `Principal`; `AuthnInterceptor` runs it on every call and sets
`current_principal` for the handler. Credentials: `authorization: Bearer <api key or JWT>` or
`x-api-key: <api key>`; a bearer starting `soma_` is an API key, anything else a JWT.

API key path: format + checksum (no I/O) -> key cache (one Postgres lookup on a miss) ->
constant-time HMAC compare (current secret, or the previous one during a rotation's grace) ->
state and expiry -> rate limit and usage budget (keys that have them) -> last use (batched).
JWT path: jwt_verify (RFC 8725 checks) -> the key behind the token must still be active.
Errors never contain the credential; logs name the key id only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import jwt
from grpc import aio

from services.common import apikeys, metrics
from services.common.auth import revocation
from services.common.auth.jwt_verify import JwtVerifier, KeySet, invalid
from services.common.auth.keycache import (
    STATE_ACTIVE,
    STATE_EXPIRED,
    KeyCache,
    KeyRecord,
    postgres_lookup,
)
from services.common.auth.limits import LastUsedRecorder, UsageLimiter
from services.common.auth.migrations import AUTH_MIGRATIONS
from services.common.auth.oidc import OidcAuthenticator
from services.common.auth.principal import Principal, current_principal
from services.common.auth.public import is_public
from services.common.auth.settings import AuthConfig
from services.common.config import Config, ConfigError
from services.common.db import migrate
from services.common.errors import Unauthenticated, Unavailable
from services.common.events import Bus
from services.common.interceptors import (
    StreamBehavior,
    UnaryBehavior,
    WrappingInterceptor,
    wrap_handler,
)
from services.common.vault import (
    JWT_KEY_NAME,
    VaultUnavailable,
    load_pepper_async,
    transit_public_keys_async,
)

log = logging.getLogger(__name__)

MISSING_MESSAGE = "missing credentials: send authorization: Bearer <api key or token> or x-api-key"
TOKEN_MAX_LIFETIME = 3600.0  # IssueToken's maximum (60 min)
DISCONNECTED_MAX_AGE = 5.0  # cache age trusted while NATS is down (key notices may be lost)
_BACKEND_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

Metadata = Iterable[Any]  # (key, value) pairs, as grpc's invocation_metadata()


def credential_from(metadata: Metadata) -> str | None:
    """The credential in the call's metadata, or None. Raises for a malformed authorization."""
    authorization = api_key = None
    for key, value in metadata:
        if isinstance(value, bytes):
            continue  # -bin headers
        if key == "authorization" and authorization is None:
            authorization = value
        elif key == "x-api-key" and api_key is None:
            api_key = value
    if authorization is not None:
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise invalid("unsupported authorization header: use Bearer <api key or token>")
        return credential.strip()
    if api_key is not None:
        return api_key.strip() or None
    return None


def credential_kind(metadata: Metadata) -> str:
    """api_key, jwt or none: what kind of credential a call presented (for metrics)."""
    try:
        credential = credential_from(metadata)
    except Unauthenticated:  # a malformed authorization header carries none we can use
        return "none"
    if credential is None:
        return "none"
    return "api_key" if apikeys.looks_like_key(credential) else "jwt"


def narrow_scopes(token: frozenset[str], key: frozenset[str]) -> frozenset[str]:
    """A token can never carry more than its key now allows (`*` means anything)."""
    if "*" in key:
        return token
    if "*" in token:
        return key
    return token & key


class Authenticator:
    def __init__(
        self,
        settings: AuthConfig,
        pepper: bytes,
        keys: KeyCache,
        tokens: JwtVerifier | None = None,
        limiter: UsageLimiter | None = None,
        last_used: LastUsedRecorder | None = None,
        oidc: OidcAuthenticator | None = None,
    ) -> None:
        self.settings = settings
        self._pepper = pepper
        self.keys = keys
        self.tokens = tokens
        self.limiter = limiter
        self.last_used = last_used
        self.oidc = oidc
        self.listener: revocation.KeyChangeListener | None = None

    @classmethod
    async def open(
        cls, config: Config, pool: asyncpg.Pool, bus: Bus | None, settings: AuthConfig | None = None
    ) -> Authenticator:
        """Applies the auth migrations (idempotent, advisory-locked), loads the pepper and the
        token keys, subscribes to key notices, starts the last-used batcher."""
        settings = settings or getattr(config, "auth", None) or AuthConfig()
        async with pool.acquire() as conn:
            await migrate(conn, "auth", AUTH_MIGRATIONS)
        if config.vault is None:
            raise ConfigError(
                f"{config.service} needs VAULT_ADDR and VAULT_TOKEN (OpenBao holds the API key "
                "pepper and the token signing keys)"
            )
        vault = config.vault
        pepper = await load_pepper_async(vault)

        async def transit_source() -> dict[str, dict[str, Any]]:
            return await transit_public_keys_async(vault)

        keyset = KeySet(
            transit_source,
            ("ES256",),
            settings.jwks_reload_min_seconds,
            kid_pattern=rf"^{re.escape(JWT_KEY_NAME)}-v[0-9]{{1,9}}$",
        )
        try:
            await keyset.load()
        except VaultUnavailable as error:  # verified lazily on the first token instead
            log.warning("token signing keys not loaded yet: %s", error)
        tokens = JwtVerifier(
            keyset,
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_leeway_seconds,
            max_lifetime=TOKEN_MAX_LIFETIME,
        )
        oidc = (
            OidcAuthenticator(settings.oidc, pool, settings.jwt_leeway_seconds)
            if settings.oidc
            else None
        )
        last_used = LastUsedRecorder(pool, settings.last_used_flush_seconds)
        auth = cls(
            settings,
            pepper,
            KeyCache(postgres_lookup(pool), ttl=settings.key_cache_ttl_seconds),
            tokens,
            UsageLimiter(pool),
            last_used,
            oidc,
        )
        if bus is not None:
            auth.listener = revocation.KeyChangeListener(bus, auth.drop_key, auth.clear_cache)
            await auth.listener.start()
        else:
            log.warning("no NATS: revoked keys are refused only after the cache TTL")
        revocation.add_local_listener(auth.drop_key)
        last_used.start()
        set_default(auth)
        return auth

    async def close(self) -> None:
        revocation.remove_local_listener(self.drop_key)
        if self.listener is not None:
            await self.listener.close()
        if self.last_used is not None:
            await self.last_used.close()
        if _default is self:
            set_default(None)

    def drop_key(self, key_id: str) -> None:
        self.keys.drop(key_id)

    def clear_cache(self) -> None:
        self.keys.clear()
        if self.oidc is not None:
            self.oidc.forget()

    # -- entry points ---------------------------------------------------------------------

    async def authenticate(self, metadata: Metadata) -> Principal:
        principal = await self.authenticate_optional(metadata)
        if principal is None:
            raise Unauthenticated(MISSING_MESSAGE, reason="CREDENTIALS_MISSING")
        return principal

    async def authenticate_optional(self, metadata: Metadata) -> Principal | None:
        credential = credential_from(metadata)
        if credential is None:
            return None
        return await self.verify_credential(credential)

    async def verify_credential(self, credential: str) -> Principal:
        if apikeys.looks_like_key(credential):
            return await self.verify_api_key(credential)
        return await self.verify_token(credential)

    async def verify_api_key(self, secret: str) -> Principal:
        """A presented API key (full text) -> its principal, charging its limits."""
        try:
            parsed = apikeys.parse(secret)
        except apikeys.InvalidKeyFormat as error:
            raise invalid(f"invalid API key: {error}") from None
        if parsed.env != self.settings.env:
            raise invalid(
                f"invalid API key: it is a {parsed.env} key; this deployment accepts "
                f"{self.settings.env} keys"
            )
        record = await self._record(parsed.key_id)
        now = datetime.now(UTC)
        if record is None or not self._secret_matches(record, secret, now):
            log.info("refused API key %s: unknown key or wrong secret", parsed.key_id)
            raise invalid("invalid API key")
        self._check_usable(record, now)
        await self._charge(record)
        return Principal(
            subject=f"key:{record.key_id}",
            tenant=record.tenant,
            roles=record.roles,
            scopes=record.scopes,
            credential="api_key",
            key_id=record.key_id,
            owner=record.owner,
        )

    async def verify_token(self, token: str) -> Principal:
        if self.oidc is not None and _unverified_issuer(token) == self.oidc.config.issuer:
            return await self.oidc.verify(token)
        if self.tokens is None:
            raise invalid("tokens are not accepted here")
        claims, kid = await self.tokens.verify(token)
        subject, key_id = claims.get("sub"), claims.get("key_id")
        if not isinstance(key_id, str) or subject != f"key:{key_id}":
            raise invalid("token subject must be key:<key_id>")
        tenant, roles, scope = claims.get("tenant"), claims.get("roles"), claims.get("scope", "")
        if (
            not isinstance(tenant, str)
            or not isinstance(roles, list)
            or not all(isinstance(r, str) for r in roles)
            or not isinstance(scope, str)
        ):
            raise invalid("token lacks valid tenant, roles or scope claims")
        if not apikeys.is_key_id(key_id):
            raise invalid("token names a malformed key id")
        record = await self._record(key_id)
        if record is None:
            raise Unauthenticated("the API key behind this token was deleted", reason="KEY_REVOKED")
        self._check_usable(record, datetime.now(UTC))
        if record.tenant != tenant:
            raise invalid("token tenant does not match its key")
        await self._charge(record)
        token_scopes = frozenset(scope.split()) or frozenset({"*"})
        return Principal(
            subject=subject,
            tenant=tenant,
            roles=frozenset(roles) & record.roles,  # a role removed from the key is gone at once
            scopes=narrow_scopes(token_scopes, record.scopes),
            credential="jwt",
            key_id=key_id,
            token_kid=kid,
            owner=record.owner,
        )

    # -- steps ----------------------------------------------------------------------------

    async def _record(self, key_id: str) -> KeyRecord | None:
        max_age = None
        if self.listener is not None:
            self.listener.check_reconnect()
            if not self.listener.connected:
                max_age = DISCONNECTED_MAX_AGE
        try:
            return await self.keys.get(key_id, max_age=max_age)
        except _BACKEND_ERRORS as error:
            log.warning("key lookup for %s failed: %s", key_id, error)
            raise Unavailable(
                "cannot verify credentials right now (key store unavailable); retry shortly",
                reason="AUTH_BACKEND_UNAVAILABLE",
            ) from None

    def _secret_matches(self, record: KeyRecord, secret: str, now: datetime) -> bool:
        if apikeys.verify(self._pepper, secret, record.secret_hash):
            return True
        return (
            record.previous_secret_hash is not None
            and record.previous_secret_expire_time is not None
            and now < record.previous_secret_expire_time
            and apikeys.verify(self._pepper, secret, record.previous_secret_hash)
        )

    @staticmethod
    def _check_usable(record: KeyRecord, now: datetime) -> None:
        expired = record.expire_time is not None and record.expire_time <= now
        if record.state == STATE_EXPIRED or (record.state == STATE_ACTIVE and expired):
            raise Unauthenticated(f"API key {record.key_id} has expired", reason="KEY_EXPIRED")
        if record.state != STATE_ACTIVE:
            raise Unauthenticated(f"API key {record.key_id} was revoked", reason="KEY_REVOKED")

    async def _charge(self, record: KeyRecord) -> None:
        if self.limiter is not None and (record.has_budget or record.rate_limit > 0):
            try:
                await self.limiter.charge(record)
            except _BACKEND_ERRORS as error:
                log.warning("usage accounting for %s failed: %s", record.key_id, error)
                raise Unavailable(
                    "cannot check this key's usage limits right now; retry shortly",
                    reason="AUTH_BACKEND_UNAVAILABLE",
                ) from None
        if self.last_used is not None:
            self.last_used.note(record.key_id)


def _unverified_issuer(token: str) -> str | None:
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.InvalidTokenError:
        return None
    return iss if isinstance(iss, str) else None


# -- the process's authenticator, for code outside the interceptor (IssueToken) -------------

_default: Authenticator | None = None


def set_default(authenticator: Authenticator | None) -> None:
    global _default
    _default = authenticator


def default_authenticator() -> Authenticator:
    if _default is None:
        raise RuntimeError("Authenticator.open() has not run in this process")
    return _default


async def authenticate(metadata: Metadata) -> Principal:
    """The caller of a call with this metadata; UNAUTHENTICATED if none or invalid."""
    return await default_authenticator().authenticate(metadata)


async def verify_api_key(secret: str) -> Principal:
    return await default_authenticator().verify_api_key(secret)


# -- the interceptor --------------------------------------------------------------------------


# on_failure(method, error, context): records a refused credential (the audit recorder).
FailureHook = Callable[[str, Unauthenticated, aio.ServicerContext], Awaitable[None]]


class AuthnInterceptor(WrappingInterceptor):
    """Slot `authn` of build_interceptors: sets `current_principal` for the call. Public
    methods run without credentials (a credential sent anyway is still verified). A refused
    credential on a non-public method is handed to `on_failure` before the call fails."""

    def __init__(
        self,
        authenticator: Authenticator,
        public: Callable[[str], bool] = is_public,
        on_failure: FailureHook | None = None,
    ) -> None:
        super().__init__()
        self._auth = authenticator
        self._public = public
        self._on_failure = on_failure

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        auth = self._auth
        public = self._public(method)
        find = auth.authenticate_optional if public else auth.authenticate
        on_failure = None if public else self._on_failure

        async def principal(context: aio.ServicerContext) -> Principal | None:
            metadata = context.invocation_metadata() or ()
            try:
                return await find(metadata)
            except Unauthenticated as error:
                metrics.auth_decision("unauthenticated", credential_kind(metadata))
                if on_failure is not None:
                    await on_failure(method, error, context)
                raise

        def around_unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                token = current_principal.set(await principal(context))
                try:
                    return await behavior(request, context)
                finally:
                    current_principal.reset(token)

            return call

        def around_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                token = current_principal.set(await principal(context))
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:  # closed here, in the call's task
                            yield response
                finally:
                    with contextlib.suppress(ValueError):  # closed from another context
                        current_principal.reset(token)

            return call

        return wrap_handler(handler, around_unary, around_stream)
