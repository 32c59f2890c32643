"""The `capsule.yaml` manifest: parsing, validation and SemVer ordering.

Every error is an `InvalidArgument` whose field names the manifest field
(`capsule.yaml: version`), so a publisher knows which line to fix.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from services.common.errors import InvalidArgument
from soma.capsule.v1 import resources_pb2

MANIFEST_NAME = "capsule.yaml"
MAX_MANIFEST_BYTES = 64 << 10

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The publisher is a tenant id (see CreateTenantRequest.tenant_id).
PUBLISHER_RE = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
# Permissions are dotted lowercase words, e.g. `network`, `filesystem.write`.
PERMISSION_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)*$")
# SemVer 2.0 (semver.org's regex) without build metadata: it does not take part in ordering,
# so two versions differing only in it would collide in the registry.
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?$"
)
_LICENSE_RE = re.compile(r"^[A-Za-z0-9.+() :-]+$")

MAX_VERSION_CHARS = 128
MAX_DESCRIPTION_CHARS = 2000
MAX_PERMISSIONS = 64
MAX_PERMISSION_CHARS = 64
MAX_HOMEPAGE_CHARS = 2048
MAX_LICENSE_CHARS = 200
MAX_PATH_CHARS = 1024

_REQUIRED = ("name", "version", "description", "publisher", "entrypoint")
_OPTIONAL = ("permissions", "homepage", "license")

# A sortable key: (major, minor, patch, prerelease) where a release's prerelease part is
# `(1,)` and a prerelease's is `(0, id, id, ...)`, ids being `(0, int)` or `(1, str)`.
SemverKey = tuple[int, int, int, tuple[Any, ...]]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str
    publisher: str
    entrypoint: str
    permissions: tuple[str, ...]
    homepage: str = ""
    license: str = ""

    def to_proto(self) -> resources_pb2.CapsuleManifest:
        return resources_pb2.CapsuleManifest(
            name=self.name,
            version=self.version,
            description=self.description,
            publisher=self.publisher,
            entrypoint=self.entrypoint,
            permissions=list(self.permissions),
            homepage=self.homepage,
            license=self.license,
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data (JSON/YAML); `manifest_from_mapping` reads it back."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "publisher": self.publisher,
            "entrypoint": self.entrypoint,
            "permissions": list(self.permissions),
        }
        if self.homepage:
            data["homepage"] = self.homepage
        if self.license:
            data["license"] = self.license
        return data


def _invalid(field: str, message: str, reason: str = "MANIFEST_INVALID") -> InvalidArgument:
    return InvalidArgument(
        f"{MANIFEST_NAME}: {message}", field=f"{MANIFEST_NAME}: {field}", reason=reason
    )


def parse_semver(text: str, *, field: str = "version") -> SemverKey:
    """Returns a key that sorts versions by SemVer 2.0 precedence (prerelease < release)."""
    if not isinstance(text, str) or len(text) > MAX_VERSION_CHARS:
        raise InvalidArgument(
            f"{field} must be a semantic version of at most {MAX_VERSION_CHARS} characters",
            field=field,
            reason="INVALID_VERSION",
        )
    if "+" in text:
        raise InvalidArgument(
            f"{field} {text!r} has build metadata ('+...'); it is not allowed, "
            "use a prerelease such as 1.2.0-rc.1 instead",
            field=field,
            reason="INVALID_VERSION",
        )
    match = _SEMVER_RE.match(text)
    if not match:
        raise InvalidArgument(
            f"{field} {text[:80]!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRERELEASE], "
            "no leading zeros), e.g. 1.2.0 or 1.2.0-beta.1",
            field=field,
            reason="INVALID_VERSION",
        )
    major, minor, patch, pre = match.groups()
    if pre is None:
        pre_key: tuple[Any, ...] = (1,)
    else:
        pre_key = (0, *((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".")))
    return int(major), int(minor), int(patch), pre_key


def check_relative_path(path: str, field: str) -> str:
    """Validates a path inside the capsule (e.g. the entrypoint) and returns it normalized."""
    problem = ""
    if not path:
        problem = "must not be empty"
    elif len(path) > MAX_PATH_CHARS:
        problem = f"is longer than {MAX_PATH_CHARS} characters"
    elif "\\" in path:
        problem = "must use '/' as separator, not '\\'"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        problem = "contains control characters"
    elif path.startswith("/"):
        problem = "must be relative to the capsule root, not absolute"
    elif ".." in path.split("/"):
        problem = "must not contain '..'"
    if problem:
        raise _invalid(field, f"{field} {path[:100]!r} {problem}")
    normalized = posixpath.normpath(path)
    if normalized == ".":
        raise _invalid(field, f"{field} {path!r} names the capsule root, not a file")
    return normalized


def _string(data: Mapping[str, Any], field: str, *, required: bool, max_chars: int) -> str:
    value = data.get(field)
    if value is None:
        if required:
            raise _invalid(field, f"{field} is required")
        return ""
    if not isinstance(value, str):
        kind = type(value).__name__
        raise _invalid(field, f"{field} must be a string, not {kind} (quote it in YAML)")
    if required and not value.strip():
        raise _invalid(field, f"{field} must not be empty")
    if len(value) > max_chars:
        raise _invalid(field, f"{field} is longer than {max_chars} characters")
    return value


def _permissions(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("permissions")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid("permissions", "permissions must be a list of strings, e.g. [network]")
    if len(value) > MAX_PERMISSIONS:
        raise _invalid("permissions", f"permissions lists more than {MAX_PERMISSIONS} entries")
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str):
            raise _invalid("permissions", f"permissions: {item!r} is not a string")
        if len(item) > MAX_PERMISSION_CHARS or not PERMISSION_RE.match(item):
            raise _invalid(
                "permissions",
                f"permission {item[:80]!r} is not valid: dotted lowercase words such as "
                "'network' or 'filesystem.write'",
            )
        if item in seen:
            raise _invalid("permissions", f"permission {item!r} is listed twice")
        seen.add(item)
    return tuple(value)


def manifest_from_mapping(data: object) -> Manifest:
    """Validates already-parsed manifest data (from YAML, or from `Manifest.to_dict`)."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(
            f"{MANIFEST_NAME} must be a YAML mapping of fields (name: ..., version: ...)",
            field=MANIFEST_NAME,
            reason="MANIFEST_INVALID",
        )
    for key in data:
        if not isinstance(key, str) or (
            key not in _REQUIRED and key not in _OPTIONAL and not key.startswith("x-")
        ):
            known = ", ".join(_REQUIRED + _OPTIONAL)
            raise _invalid(
                str(key),
                f"unknown field {str(key)[:80]!r}; known fields are {known} "
                "(extensions start with 'x-')",
            )

    name = _string(data, "name", required=True, max_chars=63)
    if not NAME_RE.match(name) or len(name) < 2:
        raise _invalid(
            "name",
            f"name {name[:80]!r} is not valid: 2 to 63 lowercase letters, digits and '-', "
            "not starting or ending with '-'",
        )
    version = _string(data, "version", required=True, max_chars=MAX_VERSION_CHARS)
    try:
        parse_semver(version)
    except InvalidArgument as exc:
        raise _invalid("version", exc.message) from None
    publisher = _string(data, "publisher", required=True, max_chars=63)
    if not PUBLISHER_RE.match(publisher):
        raise _invalid(
            "publisher",
            f"publisher {publisher[:80]!r} is not a tenant id (lowercase letters, digits and "
            "'-', 3 to 63 characters, starting with a letter)",
        )
    homepage = _string(data, "homepage", required=False, max_chars=MAX_HOMEPAGE_CHARS)
    if homepage and (
        not homepage.startswith(("https://", "http://")) or any(c.isspace() for c in homepage)
    ):
        raise _invalid("homepage", f"homepage {homepage[:100]!r} is not an http(s) URL")
    license_ = _string(data, "license", required=False, max_chars=MAX_LICENSE_CHARS)
    if license_ and not _LICENSE_RE.match(license_):
        raise _invalid("license", f"license {license_[:100]!r} is not an SPDX expression")
    entrypoint = _string(data, "entrypoint", required=True, max_chars=MAX_PATH_CHARS)
    return Manifest(
        name=name,
        version=version,
        description=_string(data, "description", required=True, max_chars=MAX_DESCRIPTION_CHARS),
        publisher=publisher,
        entrypoint=check_relative_path(entrypoint, "entrypoint"),
        permissions=_permissions(data),
        homepage=homepage,
        license=license_,
    )


def check_manifest_size(size: int, max_bytes: int = MAX_MANIFEST_BYTES) -> None:
    if size > max_bytes:
        raise InvalidArgument(
            f"{MANIFEST_NAME} is {size} bytes; at most {max_bytes} bytes are allowed",
            field=MANIFEST_NAME,
            reason="MANIFEST_TOO_LARGE",
        )


def parse_manifest(raw: bytes, *, max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
    """Parses and validates `capsule.yaml` (UTF-8 YAML, at most `max_bytes`)."""
    check_manifest_size(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{MANIFEST_NAME} is not UTF-8 (byte {exc.start})",
            field=MANIFEST_NAME,
            reason="MANIFEST_INVALID",
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InvalidArgument(
            f"{MANIFEST_NAME} is not valid YAML{at}: {problem}",
            field=MANIFEST_NAME,
            reason="MANIFEST_INVALID",
        ) from None
    return manifest_from_mapping(data)
