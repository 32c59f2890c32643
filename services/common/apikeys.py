"""API key format, generation and hashing. Pure functions: no I/O anywhere in this module.

A key reads `soma_<env>_<key id>_<secret><checksum>`:

* env: `live`, `test` or `dev` (SOMA_ENV), so a leaked key says where it works;
* key id: 16 lowercase RFC 4648 base32 chars (80 random bits). Public: the resource id
  `keys/<key id>` and what logs show;
* secret: 26 base32 chars (130 random bits);
* checksum: CRC32 of everything before it, 7 base32 chars, so a typo or a truncated paste is
  refused by `parse` before any database lookup (and secret scanners can validate hits offline).

Only `hash_secret(pepper, key_text)` is stored (HMAC-SHA-256 with a pepper kept in OpenBao):
a database dump alone cannot be used to check guesses. "secret" in this module's functions is
always the FULL key text the caller presented, so the hash also binds the env and key id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass, field

ENVS = ("live", "test", "dev")
PREFIX = "soma_"
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase
KEY_ID_LENGTH = 16
SECRET_LENGTH = 26
CHECKSUM_LENGTH = 7

# Group 1 env, 2 key id, 3 secret, 4 checksum.
KEY_PATTERN = r"^soma_(live|test|dev)_([a-z2-7]{16})_([a-z2-7]{26})([a-z2-7]{7})$"
_KEY_RE = re.compile(KEY_PATTERN)
KEY_ID_PATTERN = r"^[a-z2-7]{16}$"
_KEY_ID_RE = re.compile(KEY_ID_PATTERN)


class InvalidKeyFormat(ValueError):
    """The text is not a well-formed API key. The message never contains the text."""


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    secret: str = field(repr=False)  # the full key text, shown to its owner exactly once


@dataclass(frozen=True)
class ParsedKey:
    env: str
    key_id: str


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    """CRC32 of `body` as 7 base32 chars (35 bits hold the 32-bit CRC)."""
    return _encode(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def new_key_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()  # 80 bits = 16 chars


def is_key_id(text: str) -> bool:
    return bool(_KEY_ID_RE.match(text))


def generate(env: str, key_id: str | None = None) -> GeneratedKey:
    """A new key; pass `key_id` to give an existing key a new secret (rotation)."""
    if env not in ENVS:
        raise ValueError(f"env must be one of {', '.join(ENVS)}")
    key_id = key_id or new_key_id()
    if not is_key_id(key_id):
        raise ValueError("key id must be 16 lowercase base32 characters")
    body = f"{PREFIX}{env}_{key_id}_{_encode(secrets.randbits(130), SECRET_LENGTH)}"
    return GeneratedKey(key_id=key_id, secret=body + checksum(body))


def looks_like_key(text: str) -> bool:
    """True for anything meant as an API key (so a bearer goes to key checks, not JWT)."""
    return text.startswith(PREFIX)


def parse(text: str) -> ParsedKey:
    """Format and checksum only; raises InvalidKeyFormat. No lookup happens here."""
    match = _KEY_RE.match(text)
    if match is None:
        raise InvalidKeyFormat("malformed API key")
    cut = len(text) - CHECKSUM_LENGTH
    if not hmac.compare_digest(checksum(text[:cut]), text[cut:]):
        raise InvalidKeyFormat("malformed API key (checksum mismatch: check for a typo)")
    return ParsedKey(env=match[1], key_id=match[2])


def hash_secret(pepper: bytes, secret: str) -> bytes:
    """HMAC-SHA-256(pepper, full key text): what auth_api_keys.secret_hash stores."""
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


def verify(pepper: bytes, secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(pepper, secret), bytes(stored_hash))
