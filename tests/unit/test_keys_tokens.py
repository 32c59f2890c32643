"""Token building, the transit signature format, JWKS conversion and the ApiKey view of a row,
without OpenBao: a local P-256 key plays transit's part."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from google.protobuf.json_format import MessageToDict

from services.common.auth.principal import Principal
from services.common.vault import public_jwk
from services.keys import tokens
from services.keys.store import ACTIVE, EXPIRED, REVOKED, key_from_row

PRINCIPAL = Principal(
    subject="key:abcdefghijklmn23",
    tenant="acme",
    roles=frozenset({"member", "approver"}),
    scopes=frozenset({"gateway:read", "keys:read"}),
    credential="api_key",
    key_id="abcdefghijklmn23",
    owner="user:alice",
)


def _transit_sign(private: ec.EllipticCurvePrivateKey, version: int, data: str) -> str:
    """What transit's sign returns with marshaling_algorithm=jws: vault:v<N>:<b64url r||s>."""
    der = private.sign(data.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"vault:v{version}:{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"


def _pem(private: ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_claims() -> None:
    claims = tokens.build_claims(
        PRINCIPAL,
        issuer="soma-mesh",
        audience="soma-mesh",
        scopes=["keys:read", "gateway:read"],
        now=1000,
        ttl_seconds=600,
        jti="j1",
    )
    assert claims == {
        "iss": "soma-mesh",
        "sub": "key:abcdefghijklmn23",
        "aud": "soma-mesh",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1600,
        "jti": "j1",
        "tenant": "acme",
        "roles": ["approver", "member"],
        "scope": "gateway:read keys:read",
        "key_id": "abcdefghijklmn23",
        "owner": "user:alice",
    }


def test_a_transit_style_signature_verifies_with_pyjwt_against_the_jwks() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    kid = "soma-jwt-v3"
    now = int(datetime.now(UTC).timestamp())
    claims = tokens.build_claims(
        PRINCIPAL,
        issuer="soma-mesh",
        audience="soma-mesh",
        scopes=["*"],
        now=now,
        ttl_seconds=600,
    )
    data = tokens.signing_input(tokens.token_header(kid), claims)
    version, signature = tokens.parse_transit_signature(_transit_sign(private, 3, data))
    assert version == 3
    token = f"{data}.{signature}"

    jwks = tokens.jwks_message({kid: public_jwk(_pem(private), kid)})
    jwk = MessageToDict(jwks.keys[0], preserving_proto_field_name=True)
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}  # every field filled
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": kid}
    decoded = jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="soma-mesh", issuer="soma-mesh"
    )
    assert decoded["sub"] == "key:abcdefghijklmn23" and decoded["scope"] == "*"


def test_jwks_is_newest_first() -> None:
    keys = {}
    for version in (1, 10, 2):
        kid = f"soma-jwt-v{version}"
        keys[kid] = public_jwk(_pem(ec.generate_private_key(ec.SECP256R1())), kid)
    assert [k.kid for k in tokens.jwks_message(keys).keys] == [
        "soma-jwt-v10",
        "soma-jwt-v2",
        "soma-jwt-v1",
    ]


def test_signing_input_is_compact_json() -> None:
    data = tokens.signing_input({"alg": "ES256"}, {"a": 1})
    head, _ = data.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "ES256"}
    assert "=" not in data


def _row(**overrides: object) -> dict[str, object]:
    now = datetime.now(UTC)
    row: dict[str, object] = {
        "id": "abcdefghijklmn23",
        "tenant": "acme",
        "display_name": "ci",
        "scopes": ["*"],
        "roles": ["member"],
        "expire_time": None,
        "usage_budget": None,
        "remaining_calls": None,
        "rate_limit_per_minute": None,
        "state": ACTIVE,
        "effective_state": ACTIVE,
        "owner": "user:alice",
        "last_used_time": None,
        "create_time": now,
        "update_time": now,
        "revoke_time": None,
        "rotate_time": None,
        "previous_secret_hash": None,
        "previous_secret_expire_time": None,
        "db_now": now,
        "secret_hash": b"x",
    }
    row.update(overrides)
    return row


def test_api_key_view_never_carries_hashes_and_shows_grace_only_while_valid() -> None:
    now = datetime.now(UTC)
    key = key_from_row(_row(), "dev")
    assert key.name == "keys/abcdefghijklmn23" and key.prefix == "soma_dev_abcdefghijklmn23_"
    assert not key.HasField("previous_secret_expire_time") and key.usage_budget == 0
    in_grace = key_from_row(
        _row(previous_secret_hash=b"p", previous_secret_expire_time=now + timedelta(hours=1)),
        "dev",
    )
    assert in_grace.HasField("previous_secret_expire_time")
    over = key_from_row(
        _row(previous_secret_hash=b"p", previous_secret_expire_time=now - timedelta(seconds=1)),
        "dev",
    )
    assert not over.HasField("previous_secret_expire_time")
    budget = key_from_row(_row(usage_budget=10, remaining_calls=7), "live")
    assert (budget.usage_budget, budget.remaining_calls) == (10, 7)
    assert key_from_row(_row(effective_state=EXPIRED), "dev").state == EXPIRED
    assert key_from_row(_row(state=REVOKED, effective_state=REVOKED), "dev").state == REVOKED
