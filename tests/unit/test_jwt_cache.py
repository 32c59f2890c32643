"""The verified-token cache: a repeat skips the signature check, never the time checks."""

from __future__ import annotations

import time
from typing import Any

import jwt

from services.common.auth import jwt_verify
from tests.unit.test_authn_jwt import claims, refused, setup, sign

__all__ = ["setup"]  # the fixture, re-used


async def test_a_repeat_skips_the_signature_check(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    token = sign(private, claims())
    decodes = 0
    real = jwt.decode

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real(*args, **kw)

    monkeypatch.setattr(jwt_verify.jwt, "decode", counting)
    first = await verifier.verify(token)
    again = await verifier.verify(token)
    assert first == again and decodes == 1


async def test_a_cached_token_still_expires(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    now = int(time.time())
    token = sign(private, claims(iat=now - 60, nbf=now - 60, exp=now + 5))
    await verifier.verify(token)
    monkeypatch.setattr(jwt_verify.time, "time", lambda: now + 5 + 31)  # past exp + leeway
    await refused(verifier, token, "TOKEN_EXPIRED")


async def test_a_forgery_is_never_served_from_the_cache(setup) -> None:  # type: ignore[no-untyped-def]
    verifier, _, private, _ = setup
    token = sign(private, claims())
    await verifier.verify(token)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload[:-2]}AA.{signature}"
    await refused(verifier, tampered)  # its text differs, so it is verified, and refused
