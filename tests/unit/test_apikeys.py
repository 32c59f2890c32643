"""API key format: generation, parsing (format + checksum, no I/O), peppered hashing."""

from __future__ import annotations

import re

import pytest

from services.common import apikeys
from services.common.apikeys import InvalidKeyFormat

PEPPER = b"p" * 32


def test_generated_key_matches_documented_pattern() -> None:
    for env in apikeys.ENVS:
        key = apikeys.generate(env)
        match = re.match(apikeys.KEY_PATTERN, key.secret)
        assert match is not None
        assert match[1] == env and match[2] == key.key_id
        assert len(key.key_id) == 16 and apikeys.is_key_id(key.key_id)
        assert apikeys.parse(key.secret) == apikeys.ParsedKey(env, key.key_id)


def test_keys_are_random_and_secret_not_in_repr() -> None:
    a, b = apikeys.generate("dev"), apikeys.generate("dev")
    assert a.key_id != b.key_id and a.secret != b.secret
    assert a.secret not in repr(a)


def test_rotation_keeps_key_id() -> None:
    first = apikeys.generate("live")
    second = apikeys.generate("live", key_id=first.key_id)
    assert second.key_id == first.key_id and second.secret != first.secret
    assert apikeys.parse(second.secret).key_id == first.key_id


def test_generate_refuses_bad_env_and_key_id() -> None:
    with pytest.raises(ValueError):
        apikeys.generate("prod")
    with pytest.raises(ValueError):
        apikeys.generate("dev", key_id="NOT-A-KEY-ID")


def _flip(text: str, index: int) -> str:
    replacement = "a" if text[index] != "a" else "b"
    return text[:index] + replacement + text[index + 1 :]


@pytest.mark.parametrize("position", ["key_id", "secret", "checksum"])
def test_single_character_typo_fails_checksum(position: str) -> None:
    key = apikeys.generate("dev").secret
    index = {"key_id": 10, "secret": 30, "checksum": len(key) - 1}[position]
    with pytest.raises(InvalidKeyFormat) as raised:
        apikeys.parse(_flip(key, index))
    assert key not in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "soma_dev_",
        "soma_prod_aaaaaaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "soma_dev_AAAAAAAAAAAAAAAA_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "soma_dev_aaaaaaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # one char short
        "Bearer soma_dev_aaaaaaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
)
def test_malformed_texts_are_refused(text: str) -> None:
    with pytest.raises(InvalidKeyFormat):
        apikeys.parse(text)


def test_whitespace_and_case_are_refused() -> None:
    key = apikeys.generate("dev").secret
    for text in (key + "\n", " " + key, key.upper()):
        with pytest.raises(InvalidKeyFormat):
            apikeys.parse(text)


def test_checksum_is_crc32_in_seven_base32_chars() -> None:
    key = apikeys.generate("test").secret
    body, check = key[:-7], key[-7:]
    assert apikeys.checksum(body) == check
    assert len(apikeys.checksum("x")) == 7


def test_hash_and_verify() -> None:
    key = apikeys.generate("dev").secret
    stored = apikeys.hash_secret(PEPPER, key)
    assert len(stored) == 32
    assert apikeys.verify(PEPPER, key, stored)
    assert apikeys.verify(PEPPER, key, memoryview(stored))  # asyncpg may hand back views
    assert not apikeys.verify(b"q" * 32, key, stored)  # another pepper
    assert not apikeys.verify(PEPPER, apikeys.generate("dev").secret, stored)


def test_looks_like_key() -> None:
    assert apikeys.looks_like_key("soma_live_whatever")
    assert not apikeys.looks_like_key("eyJhbGciOiJFUzI1NiJ9.e30.sig")
