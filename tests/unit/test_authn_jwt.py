"""JWT verification (RFC 8725 checklist) with locally generated EC keys; no OpenBao."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from services.common.auth.jwt_verify import JwtVerifier, KeySet, check_header
from services.common.errors import Unauthenticated

ISSUER = "soma-mesh"
AUDIENCE = "soma-mesh"
KID = "soma-jwt-v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Jwks:
    """A JWKS source that counts loads; keys can be added as if rotated."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Any]] = {}
        self.loads = 0

    def add(self, kid: str) -> ec.EllipticCurvePrivateKey:
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
        jwk.update(kid=kid, alg="ES256", use="sig")
        self.keys[kid] = jwk
        return private

    async def __call__(self) -> dict[str, dict[str, Any]]:
        self.loads += 1
        return dict(self.keys)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "key:abcdefghijklmnop",
        "key_id": "abcdefghijklmnop",
        "tenant": "acme",
        "roles": ["member"],
        "scope": "*",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
async def setup() -> tuple[JwtVerifier, Jwks, ec.EllipticCurvePrivateKey, Clock]:
    source = Jwks()
    private = source.add(KID)
    clock = Clock()
    keys = KeySet(source, ("ES256",), min_interval=10.0, clock=clock)
    await keys.load()
    verifier = JwtVerifier(keys, ISSUER, AUDIENCE, leeway=30, max_lifetime=3600)
    return verifier, source, private, clock


def sign(private: Any, payload: dict[str, Any], **header: Any) -> str:
    headers = {"kid": KID, "typ": "at+jwt", **header}
    return jwt.encode(payload, private, algorithm="ES256", headers=headers)


async def refused(verifier: JwtVerifier, token: str, reason: str = "CREDENTIALS_INVALID") -> str:
    with pytest.raises(Unauthenticated) as raised:
        await verifier.verify(token)
    assert raised.value.reason == reason
    assert not token or token not in raised.value.message
    return raised.value.message


async def test_valid_token(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    verified, kid = await verifier.verify(sign(private, claims()))
    assert kid == KID and verified["tenant"] == "acme"


async def test_expired_token(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    token = sign(private, claims(iat=now - 700, nbf=now - 700, exp=now - 60))
    await refused(verifier, token, "TOKEN_EXPIRED")


async def test_expiry_within_leeway_is_accepted(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    await verifier.verify(sign(private, claims(iat=now - 600, nbf=now - 600, exp=now - 10)))


async def test_nbf_in_future(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    await refused(verifier, sign(private, claims(nbf=now + 120, exp=now + 600)))


async def test_iat_in_future(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    await refused(verifier, sign(private, claims(iat=now + 300, nbf=None, exp=now + 600)))


async def test_wrong_or_missing_audience(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    await refused(verifier, sign(private, claims(aud="other-service")))
    await refused(verifier, sign(private, claims(aud=None)))
    await verifier.verify(sign(private, claims(aud=["other", AUDIENCE])))


@pytest.mark.parametrize(
    "issuer", ["https://evil.example/soma-mesh", "soma-mesh-evil", "soma-mes", "Soma-Mesh", ""]
)
async def test_issuer_must_match_exactly(setup, issuer: str) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    await refused(verifier, sign(private, claims(iss=issuer)))


def sign_raw(private: Any, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Signs without PyJWT's encode-side checks, as an attacker's tool would."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), private)
    return f"{signing_input}.{_b64(signature)}"


async def test_issuer_list_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    header = {"alg": "ES256", "typ": "at+jwt", "kid": KID}
    await verifier.verify(sign_raw(private, header, claims()))  # the helper itself is sound
    await refused(verifier, sign_raw(private, header, claims(iss=[ISSUER, "x"])))


async def test_alg_none(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, _, _ = setup
    header = _b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": KID}).encode())
    payload = _b64(json.dumps(claims()).encode())
    await refused(verifier, f"{header}.{payload}.")


async def test_hs256_signed_with_public_key(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": KID}).encode())
    payload = _b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    await refused(verifier, f"{header}.{payload}.{_b64(mac)}")


async def test_rs256_refused(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, _, _ = setup
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": KID, "typ": "at+jwt"})
    await refused(verifier, token)


async def test_signed_by_another_key_with_known_kid(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, _, _ = setup
    other = ec.generate_private_key(ec.SECP256R1())
    await refused(verifier, sign(other, claims()))


async def test_tampered_payload(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    header, _, signature = sign(private, claims()).split(".")
    forged = _b64(json.dumps(claims(roles=["platform_admin"])).encode())
    message = await refused(verifier, f"{header}.{forged}.{signature}")
    assert "signature" in message


async def test_unknown_crit(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    token = sign(private, claims(), crit=["exp-x"], **{"exp-x": 1})
    await refused(verifier, token)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt2", None])
async def test_wrong_typ(setup, typ: str | None) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    payload = claims()
    headers: dict[str, Any] = {"kid": KID}
    if typ is not None:
        headers["typ"] = typ
    token = jwt.encode(payload, private, algorithm="ES256", headers=headers)
    if typ is None:
        # PyJWT adds typ JWT by default; drop it explicitly to test a missing typ too.
        token = jwt.encode(payload, private, algorithm="ES256", headers={**headers, "typ": None})
    await refused(verifier, token)


async def test_media_type_form_of_typ_is_accepted(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    await verifier.verify(sign(private, claims(), typ="application/at+jwt"))


async def test_missing_kid_and_missing_exp(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    no_kid = jwt.encode(claims(), private, algorithm="ES256", headers={"typ": "at+jwt"})
    await refused(verifier, no_kid)
    await refused(verifier, sign(private, claims(exp=None)))


async def test_lifetime_longer_than_accepted(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    await refused(verifier, sign(private, claims(exp=now + 7200)))


async def test_garbage(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, _, _ = setup
    for token in ("x", "a.b.c", "eyJhbGciOiJFUzI1NiJ9", ""):
        await refused(verifier, token)


async def test_unknown_kid_reloads_at_most_once_per_interval(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, source, private, clock = setup
    assert source.loads == 1
    await refused(verifier, sign(private, claims(), kid="soma-jwt-v9"))
    assert source.loads == 1  # loaded at t=1000 and it is still t=1000: no reload
    clock.now += 11
    for _ in range(5):
        await refused(verifier, sign(private, claims(), kid="soma-jwt-v9"))
    assert source.loads == 2  # one reload for five unknown-kid tokens


async def test_rotation_new_kid_found_by_reload_old_still_valid(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, source, old, clock = setup
    new = source.add("soma-jwt-v2")
    clock.now += 10
    _, kid = await verifier.verify(sign(new, claims(), kid="soma-jwt-v2"))
    assert kid == "soma-jwt-v2"
    await verifier.verify(sign(old, claims()))  # the previous version verifies until exp


async def test_empty_keyset_reloads_at_once() -> None:
    source = Jwks()
    keys = KeySet(source, ("ES256",), min_interval=10.0, clock=Clock())
    await keys.load()
    private = source.add(KID)  # the Keys service created the key just after our start
    verifier = JwtVerifier(keys, ISSUER, AUDIENCE)
    await verifier.verify(sign(private, claims()))


async def test_kid_of_a_foreign_shape_never_reloads() -> None:
    source = Jwks()
    private = source.add(KID)
    clock = Clock()
    keys = KeySet(source, min_interval=10.0, clock=clock, kid_pattern=r"^soma-jwt-v[0-9]+$")
    await keys.load()
    clock.now += 60
    verifier = JwtVerifier(keys, ISSUER, AUDIENCE)
    await refused(verifier, sign(private, claims(), kid="../../etc/passwd"))
    assert source.loads == 1
    await refused(verifier, sign(private, claims(), kid="soma-jwt-v7"))
    assert source.loads == 2


def test_check_header_returns_kid() -> None:
    allowed = frozenset({"ES256"})
    assert check_header({"alg": "ES256", "typ": "at+jwt", "kid": "k"}, allowed, None) == "k"
    with pytest.raises(Unauthenticated):
        check_header({"alg": "ES256", "typ": "at+jwt", "kid": 5}, allowed, None)
    with pytest.raises(Unauthenticated):
        check_header({"alg": "ES256", "kid": "k", "crit": []}, allowed, None)
