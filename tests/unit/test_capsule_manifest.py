"""capsule.yaml parsing and validation, and SemVer ordering."""

from __future__ import annotations

import random

import pytest

from services.capsule.manifest import (
    MANIFEST_NAME,
    Manifest,
    manifest_from_mapping,
    parse_manifest,
    parse_semver,
)
from services.capsule.store import semver_sort_key
from services.common.errors import InvalidArgument

GOOD = """\
name: hello-world
version: 1.2.0-rc.1
description: Says hello to the world
publisher: acme
entrypoint: ./bin/run.sh
permissions: [network, filesystem.write]
homepage: https://example.com/hello
license: Apache-2.0 OR MIT
x-build: {tool: make}
"""


def test_parse_valid_manifest() -> None:
    manifest = parse_manifest(GOOD.encode())
    assert manifest == Manifest(
        name="hello-world",
        version="1.2.0-rc.1",
        description="Says hello to the world",
        publisher="acme",
        entrypoint="bin/run.sh",  # normalized
        permissions=("network", "filesystem.write"),
        homepage="https://example.com/hello",
        license="Apache-2.0 OR MIT",
    )
    proto = manifest.to_proto()
    assert proto.name == "hello-world"
    assert list(proto.permissions) == ["network", "filesystem.write"]
    assert proto.license == "Apache-2.0 OR MIT"
    assert manifest_from_mapping(manifest.to_dict()) == manifest


def test_optional_fields_default_empty() -> None:
    text = "name: ab\nversion: 0.0.1\ndescription: d\npublisher: acme\nentrypoint: main.py\n"
    manifest = parse_manifest(text.encode())
    assert manifest.permissions == ()
    assert manifest.homepage == manifest.license == ""


def _replace(field: str, value: str | None) -> bytes:
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{field}:")]
    if value is not None:
        lines.append(f"{field}: {value}")
    return "\n".join(lines).encode()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("name", None, "name is required"),
        ("name", "Hello", "not valid"),
        ("name", "a", "not valid"),
        ("name", "-ab", "not valid"),
        ("name", "x" * 64, "longer than 63"),
        ("name", "[a, b]", "must be a string"),
        ("version", None, "version is required"),
        ("version", "1.2", "must be a string"),  # YAML reads 1.2 as a float
        ("version", "'1.2'", "not a semantic version"),
        ("version", "01.2.3", "not a semantic version"),
        ("version", "1.2.3+build.5", "build metadata"),
        ("version", "1.2.3-", "not a semantic version"),
        ("description", None, "description is required"),
        ("description", "''", "must not be empty"),
        ("description", "x" * 2001, "longer than 2000"),
        ("publisher", None, "publisher is required"),
        ("publisher", "Acme", "not a tenant id"),
        ("entrypoint", None, "entrypoint is required"),
        ("entrypoint", "/bin/sh", "not absolute"),
        ("entrypoint", "../run.sh", "'..'"),
        ("entrypoint", "'bin\\\\run.sh'", "'\\'"),
        ("entrypoint", ".", "capsule root"),
        ("permissions", "network", "must be a list"),
        ("permissions", "[Network]", "not valid"),
        ("permissions", "[network, network]", "listed twice"),
        ("permissions", "[1]", "not a string"),
        ("homepage", "ftp://example.com", "not an http(s) URL"),
        ("license", "'MIT; rm -rf /'", "not an SPDX"),
    ],
)
def test_errors_name_the_field(field: str, value: str | None, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_manifest(_replace(field, value))
    error = caught.value
    assert error.violations[0][0] == f"{MANIFEST_NAME}: {field}"
    assert fragment in error.message
    assert error.reason == "MANIFEST_INVALID"


def test_unknown_field_is_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_manifest(GOOD.encode() + b"permisions: [network]\n")
    assert caught.value.violations[0][0] == f"{MANIFEST_NAME}: permisions"
    assert "unknown field 'permisions'" in caught.value.message


@pytest.mark.parametrize(
    ("raw", "fragment", "reason"),
    [
        (b"- a\n- b\n", "must be a YAML mapping", "MANIFEST_INVALID"),
        (b"name: [unclosed\n", "not valid YAML at line", "MANIFEST_INVALID"),
        (b"\xff\xfe", "not UTF-8", "MANIFEST_INVALID"),
        (b"description: " + b"x" * (64 << 10), "at most 65536 bytes", "MANIFEST_TOO_LARGE"),
    ],
)
def test_whole_file_errors(raw: bytes, fragment: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_manifest(raw)
    assert caught.value.violations[0][0] == MANIFEST_NAME
    assert fragment in caught.value.message
    assert caught.value.reason == reason


def test_yaml_tags_are_not_executed() -> None:
    with pytest.raises(InvalidArgument):
        parse_manifest(b"name: !!python/object/apply:os.system ['true']\n")


# The order given by semver.org, section 11, and a few edges around it.
SEMVER_ORDER = [
    "0.9.0",
    "1.0.0-0",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-alpha-x",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.2.0",
    "1.10.0",
    "2.0.0-0",
    "2.0.0",
    "10.0.0",
]


def test_semver_precedence() -> None:
    shuffled = list(reversed(SEMVER_ORDER))
    assert sorted(shuffled, key=parse_semver) == SEMVER_ORDER
    assert parse_semver("1.2.3") == (1, 2, 3, (1,))


def test_sort_keys_follow_semver_precedence_bytewise() -> None:
    shuffled = SEMVER_ORDER[:]
    random.Random(5).shuffle(shuffled)
    # Byte order, as PostgreSQL compares the column (COLLATE "C").
    assert sorted(shuffled, key=lambda v: semver_sort_key(parse_semver(v)).encode()) == SEMVER_ORDER


@pytest.mark.parametrize(
    "text", ["", "1", "1.2", "v1.2.3", "1.2.3.4", "1.02.3", "1.2.3-01", "1.2.3-a..b", "1.2.3+b"]
)
def test_semver_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_semver(text, field="version")
    assert caught.value.reason == "INVALID_VERSION"
    assert caught.value.violations[0][0] == "version"
