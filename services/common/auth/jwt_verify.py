"""JWT access token verification, following RFC 8725 (JWT best current practices).

Checked before the signature, from the header alone: `typ` (explicit typing, RFC 9068
`at+jwt`), `alg` on an allow-list AND equal to the algorithm pinned to the key with that `kid`
(so `none`, HS256-with-the-public-key and RS/ES confusion cannot happen), no `crit` (we
implement no header extension, so any critical one is unknown), a `kid` we know. Then PyJWT
verifies the signature with that one key and only that algorithm, `exp`/`nbf`/`iat` with
leeway and `aud`; `iss` is compared exactly here (never a substring or prefix match).

Keys come from a JWKS source (OpenBao transit for our own tokens, an HTTP JWKS for an external
OIDC issuer), cached in memory and reloaded when an unknown `kid` shows up, at most once per
`min_interval` seconds so junk tokens cannot turn into a flood of reloads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from services.common import metrics
from services.common.errors import Unauthenticated

log = logging.getLogger(__name__)

JwksSource = Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]  # kid -> JWK
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
VERIFIED_CACHE_SIZE = 10_000
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384"}


def invalid(message: str) -> Unauthenticated:
    return Unauthenticated(message, reason="CREDENTIALS_INVALID")


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    alg: str
    key: Any  # a cryptography public key


def key_from_jwk(kid: str, jwk: Mapping[str, Any], allowed_algs: Iterable[str]) -> VerificationKey:
    """Pins the key's algorithm: the JWK's `alg`, or the only one its type allows."""
    kty = jwk.get("kty")
    key: Any
    alg = jwk.get("alg")
    if kty == "EC":
        alg = alg or next((a for a, c in _EC_CURVES.items() if c == jwk.get("crv")), None)
        if alg not in _EC_CURVES or jwk.get("crv") != _EC_CURVES[alg]:
            raise ValueError(f"key {kid}: EC key with alg {alg} and crv {jwk.get('crv')}")
        key = ECAlgorithm.from_jwk(json.dumps(dict(jwk)))
    elif kty == "RSA":
        alg = alg or "RS256"
        if not alg.startswith(("RS", "PS")):
            raise ValueError(f"key {kid}: RSA key with alg {alg}")
        key = RSAAlgorithm.from_jwk(json.dumps(dict(jwk)))
    else:
        raise ValueError(f"key {kid}: unsupported key type {kty}")
    if alg not in set(allowed_algs):
        raise ValueError(f"key {kid}: alg {alg} is not allowed here")
    if jwk.get("use") not in (None, "sig"):
        raise ValueError(f"key {kid}: not a signing key (use={jwk.get('use')})")
    return VerificationKey(kid=kid, alg=alg, key=key)


class KeySet:
    def __init__(
        self,
        source: JwksSource,
        allowed_algs: Iterable[str] = ("ES256",),
        min_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        kid_pattern: str | None = None,
    ) -> None:
        self._source = source
        self._kid_pattern = re.compile(kid_pattern) if kid_pattern else None
        self.allowed_algs = frozenset(allowed_algs)
        self._min_interval = min_interval
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._last_load: float | None = None
        self._lock = asyncio.Lock()
        self.loads = 0

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    async def load(self) -> None:
        self._last_load = self._clock()
        self.loads += 1
        jwks = await self._source()
        keys = {}
        for kid, jwk in jwks.items():
            try:
                keys[kid] = key_from_jwk(kid, jwk, self.allowed_algs)
            except (ValueError, KeyError, TypeError, jwt.InvalidKeyError) as error:
                log.warning("ignoring JWKS key: %s", error)
        self._keys = keys

    async def get(self, kid: str) -> VerificationKey | None:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is None and self._may_reload(kid):
                try:
                    await self.load()
                except Exception as error:  # keep the old keys; the caller is refused
                    log.warning("could not reload signing keys: %s", error)
                key = self._keys.get(kid)
            return key

    def _may_reload(self, kid: str) -> bool:
        if self._kid_pattern is not None and not self._kid_pattern.match(kid):
            return False  # not even the shape of our kids: no reason to ask OpenBao
        if not self._keys:
            # No key yet (loaded before the Keys service created one): the first token must
            # not wait out the interval. Reloads stay serialized by the lock.
            return True
        return self._last_load is None or self._clock() - self._last_load >= self._min_interval


def check_header(
    header: Mapping[str, Any], allowed_algs: frozenset[str], types: frozenset[str] | None
) -> str:
    """The RFC 8725 header checks; returns the kid. `types` None: `typ` may be anything."""
    typ = header.get("typ")
    if types is not None and (not isinstance(typ, str) or typ.lower() not in types):
        raise invalid("token type must be at+jwt (an access token)")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed_algs:
        raise invalid(f"token algorithm must be {' or '.join(sorted(allowed_algs))}")
    if "crit" in header:
        raise invalid("token has critical header parameters this server does not understand")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise invalid("token has no key id (kid)")
    return kid


class JwtVerifier:
    def __init__(
        self,
        keys: KeySet,
        issuer: str,
        audience: str,
        leeway: float = 30.0,
        types: frozenset[str] | None = ACCESS_TOKEN_TYPES,
        max_lifetime: float | None = None,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.types = types
        self.max_lifetime = max_lifetime
        # Tokens that verified, by their exact text: a signature and its claims never change,
        # so a repeat only needs the time checks (and the key still published). Verifying an
        # ES256 signature cost ~20% of an authenticated read.
        self._verified: OrderedDict[str, tuple[dict[str, Any], str]] = OrderedDict()

    async def verify(self, token: str) -> tuple[dict[str, Any], str]:
        """The verified claims and the kid; raises Unauthenticated (never echoing the token)."""
        hit = self._verified.get(token)
        if hit is not None:
            claims, kid = hit
            now = time.time()
            if now > float(claims["exp"]) + self.leeway:
                del self._verified[token]
                raise Unauthenticated("token expired; request a new one", reason="TOKEN_EXPIRED")
            if float(claims.get("nbf", 0)) - self.leeway <= now and await self.keys.get(kid):
                self._verified.move_to_end(token)
                metrics.cache_lookup("jwt", True)
                return claims, kid
            del self._verified[token]
        metrics.cache_lookup("jwt", False)
        claims, kid = await self._verify_uncached(token)
        self._verified[token] = (claims, kid)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims, kid

    async def _verify_uncached(self, token: str) -> tuple[dict[str, Any], str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid("malformed token") from None
        kid = check_header(header, self.keys.allowed_algs, self.types)
        key = await self.keys.get(kid)
        if key is None:
            raise invalid(f"token signed with an unknown key ({kid})")
        if header["alg"] != key.alg:
            raise invalid(f"token algorithm does not match key {kid}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "token expired; request a new one", reason="TOKEN_EXPIRED"
            ) from None
        except jwt.ImmatureSignatureError:
            raise invalid("token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise invalid(f"token audience must include {self.audience}") from None
        except jwt.InvalidSignatureError:
            raise invalid("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as error:
            raise invalid(f"token lacks the {error.claim} claim") from None
        except jwt.InvalidTokenError:
            raise invalid("invalid token") from None
        if claims.get("iss") != self.issuer:  # exact: no substring, prefix or list match
            raise invalid(f"token issuer must be {self.issuer}")
        if self.max_lifetime is not None:
            lifetime = float(claims["exp"]) - float(claims["iat"])
            if lifetime > self.max_lifetime + self.leeway:
                raise invalid("token lifetime is longer than this server accepts")
        return claims, kid
