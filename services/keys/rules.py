"""Pure rules of the Keys service: names, role and scope subsets, field masks, durations.

No I/O here, so every rule is unit-tested directly.

Roles imply others (`platform_admin` > `admin` > `approver` > `member`; `admin` > `auditor`): a
caller may grant any role it holds or that one of its roles implies, so an admin can create a
member key, and nobody can grant a role above their own.

Scopes: `*` or `<service>:read` / `<service>:write` (service gateway, keys, audit, capsule;
`<service>.read` is accepted and stored as `<service>:read`). A caller may only grant scopes it
holds itself; `*` (or no scopes at all) covers every scope.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from services.common.apikeys import is_key_id
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.names import parse_name

ALL_SCOPES = "*"
SCOPE_SERVICES = ("gateway", "keys", "audit", "capsule")
SCOPE_ACTIONS = ("read", "write")
DEFAULT_SCOPES = (ALL_SCOPES,)
DEFAULT_ROLES = ("member",)
KEY_ROLES = ("platform_admin", "admin", "member", "approver", "auditor")
TENANT_ROLES = ("admin", "member", "approver", "auditor")  # relations on `tenant:<id>`
ADMIN_ROLES = frozenset({"admin", "platform_admin"})
PLATFORM_ADMIN = "platform_admin"
PLATFORM_OBJECT = "platform:soma"

_IMPLIES: dict[str, frozenset[str]] = {
    "platform_admin": frozenset({"admin", "member", "approver", "auditor"}),
    "admin": frozenset({"member", "approver", "auditor"}),
    "approver": frozenset({"member"}),
}

KEY_UPDATE_PATHS = frozenset(
    {"display_name", "scopes", "roles", "expire_time", "usage_budget", "rate_limit_per_minute"}
)
TENANT_UPDATE_PATHS = frozenset({"display_name", "enterprise_mode"})

MAX_DISPLAY_NAME = 200
MAX_REASON = 500
DEFAULT_GRACE = timedelta(hours=24)
MAX_GRACE = timedelta(days=30)
DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_TOKEN_TTL = timedelta(minutes=60)

_TENANT_ID = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
_SUBJECT = re.compile(r"^(user|key):[A-Za-z0-9._@|+-]{1,255}$")
_OBJECT = re.compile(r"^[a-z][a-z0-9_]{0,30}:[A-Za-z0-9._@|+-]{1,255}$")
_RELATION = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


# -- names --------------------------------------------------------------------------------------


def parse_key_name(name: str, field: str = "name") -> str:
    """The key id in `keys/<key id>` (16 lowercase base32 chars, not a UUID)."""
    if not name:
        raise InvalidArgument(f"{field} is required, e.g. keys/<key id>", field=field)
    key_id = name[len("keys/") :] if name.startswith("keys/") else ""
    if not is_key_id(key_id):
        raise InvalidArgument(
            f"{field} {name[:100]!r} is not a valid key name; expected keys/<key id> "
            "(16 characters of a-z and 2-7)",
            field=field,
        )
    return key_id


def parse_tenant_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidArgument(f"{field} is required, e.g. tenants/acme", field=field)
    tenant = name[len("tenants/") :] if name.startswith("tenants/") else ""
    if not _TENANT_ID.match(tenant):
        raise InvalidArgument(
            f"{field} {name[:100]!r} is not a valid tenant name; expected tenants/<tenant id>",
            field=field,
        )
    return tenant


def parse_binding_name(name: str, field: str = "name") -> str:
    return parse_name(name, "roleBindings", field)


def check_tenant_id(tenant_id: str, field: str = "tenant_id") -> str:
    if not _TENANT_ID.match(tenant_id):
        raise InvalidArgument(
            f"{field} {tenant_id[:100]!r} is not valid: use 3 to 63 lowercase letters, digits "
            "and '-', starting with a letter",
            field=field,
        )
    return tenant_id


# -- roles and scopes ---------------------------------------------------------------------------


def effective_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles held plus every role they imply."""
    held = set(roles)
    for role in list(held):
        held |= _IMPLIES.get(role, frozenset())
    return frozenset(held)


def is_admin(roles: Iterable[str]) -> bool:
    return not ADMIN_ROLES.isdisjoint(roles)


def normalize_roles(requested: Sequence[str], field: str) -> list[str]:
    roles = sorted(set(requested)) or list(DEFAULT_ROLES)
    unknown = [r for r in roles if r not in KEY_ROLES]
    if unknown:
        raise InvalidArgument(
            f"{field}: unknown role {unknown[0][:64]!r}; use {', '.join(KEY_ROLES)}", field=field
        )
    return roles


def check_grantable_roles(requested: Iterable[str], caller_roles: Iterable[str]) -> None:
    allowed = effective_roles(caller_roles)
    missing = sorted(set(requested) - allowed)
    if missing:
        raise PermissionDenied(
            f"you cannot grant role {missing[0]!r}: a key can only get roles its creator holds",
            reason="ROLE_NOT_GRANTABLE",
        )


def canonical_scope(scope: str) -> str:
    """`gateway.read` (the contract's spelling) and `gateway:read` are the same scope."""
    service, sep, action = scope.partition(".")
    return f"{service}:{action}" if sep and ":" not in scope else scope


def valid_scope(scope: str) -> bool:
    if scope == ALL_SCOPES:
        return True
    service, sep, action = scope.partition(":")
    return bool(sep) and service in SCOPE_SERVICES and action in SCOPE_ACTIONS


def normalize_scopes(requested: Sequence[str], field: str, default: Sequence[str]) -> list[str]:
    scopes = sorted({canonical_scope(s) for s in requested}) or sorted(set(default))
    bad = [s for s in scopes if not valid_scope(s)]
    if bad:
        raise InvalidArgument(
            f"{field}: unknown scope {bad[0][:64]!r}; use '*' or '<service>:read' / "
            f"'<service>:write' with service {', '.join(SCOPE_SERVICES)}",
            field=field,
        )
    if ALL_SCOPES in scopes:
        return [ALL_SCOPES]
    return scopes


def scopes_cover(held: Iterable[str], scope: str) -> bool:
    """No scopes at all means everything the roles allow, like `*`."""
    held = {canonical_scope(s) for s in held}
    return not held or ALL_SCOPES in held or canonical_scope(scope) in held


def check_scope_subset(requested: Iterable[str], held: Iterable[str], what: str) -> None:
    held = frozenset(held)
    for scope in requested:
        if not scopes_cover(held, scope):
            raise PermissionDenied(
                f"scope {scope!r} is not held by {what}: scopes can only be narrowed",
                reason="SCOPE_NOT_GRANTABLE",
            )


def within_power(
    key_roles: Iterable[str],
    key_scopes: Iterable[str],
    caller_roles: Iterable[str],
    caller_scopes: Iterable[str],
) -> bool:
    """Whether a key grants nothing beyond the caller: its roles are ones the caller may grant
    and its scopes are covered by the caller's. Changing (above all rotating, which hands out
    a new secret) a more powerful key would be an escalation."""
    if not set(key_roles) <= effective_roles(caller_roles):
        return False
    return all(scopes_cover(caller_scopes, s) for s in key_scopes or [ALL_SCOPES])


# -- field masks and values ---------------------------------------------------------------------


def check_update_mask(paths: Sequence[str], allowed: frozenset[str]) -> frozenset[str]:
    if not paths:
        raise InvalidArgument(
            f"update_mask is required: list the fields to change ({', '.join(sorted(allowed))})",
            field="update_mask",
        )
    for path in paths:
        if path not in allowed:
            raise InvalidArgument(
                f"update_mask path {path[:64]!r} cannot be updated; use any of "
                f"{', '.join(sorted(allowed))} ('*' is not accepted)",
                field="update_mask",
            )
    return frozenset(paths)


def check_display_name(value: str, field: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"{field} is at most {MAX_DISPLAY_NAME} characters", field=field)
    return value


def check_non_negative(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field} must not be negative (0 means unlimited)", field=field)
    return value


def duration(
    value: Duration | None, default: timedelta, maximum: timedelta, field: str, *, zero_ok: bool
) -> timedelta:
    """A request Duration within (0 or a positive minimum, maximum]; unset -> default."""
    if value is None:
        return default
    if value.nanos < 0 or value.seconds < 0:
        raise InvalidArgument(f"{field} must not be negative", field=field)
    result = value.ToTimedelta()
    if result == timedelta(0) and not zero_ok:
        raise InvalidArgument(f"{field} must be positive", field=field)
    if result > maximum:
        most, got = int(maximum.total_seconds()), int(result.total_seconds())
        raise InvalidArgument(f"{field} is at most {most}s (got {got}s)", field=field)
    return result


# -- relationship tuples ------------------------------------------------------------------------


def check_subject(subject: str, field: str) -> str:
    if not _SUBJECT.match(subject):
        raise InvalidArgument(
            f"{field} {subject[:100]!r} is not a subject; use user:<id> or key:<key id>",
            field=field,
        )
    if subject.startswith("key:") and not is_key_id(subject[4:]):
        raise InvalidArgument(f"{field}: {subject[:100]!r} is not a valid key id", field=field)
    return subject


def check_object(obj: str, field: str) -> str:
    if not _OBJECT.match(obj):
        raise InvalidArgument(
            f"{field} {obj[:100]!r} is not an object; use <type>:<id>, e.g. tenant:acme",
            field=field,
        )
    return obj


def check_relation(relation: str, obj: str, field: str) -> str:
    if not _RELATION.match(relation):
        raise InvalidArgument(f"{field} {relation[:64]!r} is not a relation", field=field)
    if obj.startswith("tenant:") and relation not in TENANT_ROLES:
        raise InvalidArgument(
            f"{field}: relations on a tenant are the roles {', '.join(TENANT_ROLES)}", field=field
        )
    if obj == PLATFORM_OBJECT and relation != "admin":
        raise InvalidArgument(f"{field}: the only relation on {PLATFORM_OBJECT} is admin")
    return relation
