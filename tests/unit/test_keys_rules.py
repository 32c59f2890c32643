"""Pure rules of the Keys service: names, roles, scopes, field masks, durations, tuples."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration

from services.common.errors import InvalidArgument, PermissionDenied
from services.keys import rules


def test_key_names_are_base32_ids_not_uuids() -> None:
    assert rules.parse_key_name("keys/abcdefghijklmn23") == "abcdefghijklmn23"
    for bad in (
        "",
        "keys/",
        "keys/ABCDEFGHIJKLMN23",
        "keys/abcdefghijklmn01",
        "sessions/x",
        "keys/0b8e2a4c-8a43-4a53-9c1a-8f3c1c7d2e11",
    ):
        with pytest.raises(InvalidArgument):
            rules.parse_key_name(bad)


def test_tenant_names_and_ids() -> None:
    assert rules.parse_tenant_name("tenants/acme") == "acme"
    assert rules.check_tenant_id("acme-2") == "acme-2"
    for bad in ("ab", "1acme", "Acme", "a_b", "a" * 64):
        with pytest.raises(InvalidArgument):
            rules.check_tenant_id(bad)
    with pytest.raises(InvalidArgument):
        rules.parse_tenant_name("tenant/acme")


def test_roles_default_to_member_and_unknown_roles_are_invalid() -> None:
    assert rules.normalize_roles([], "roles") == ["member"]
    assert rules.normalize_roles(["member", "auditor", "member"], "roles") == ["auditor", "member"]
    with pytest.raises(InvalidArgument):
        rules.normalize_roles(["root"], "roles")


@pytest.mark.parametrize(
    ("caller", "requested", "ok"),
    [
        ({"admin"}, ["member"], True),
        ({"admin"}, ["admin", "approver", "auditor"], True),
        ({"admin"}, ["platform_admin"], False),
        ({"platform_admin"}, ["admin", "platform_admin"], True),
        ({"member"}, ["member"], True),
        ({"member"}, ["admin"], False),
        ({"member"}, ["approver"], False),
        ({"approver"}, ["member", "approver"], True),
        ({"auditor"}, ["member"], False),
    ],
)
def test_a_caller_grants_only_roles_it_holds_or_implies(
    caller: set[str], requested: list[str], ok: bool
) -> None:
    if ok:
        rules.check_grantable_roles(requested, caller)
    else:
        with pytest.raises(PermissionDenied):
            rules.check_grantable_roles(requested, caller)


def test_scopes_are_validated_and_canonical() -> None:
    assert rules.normalize_scopes([], "scopes", ["*"]) == ["*"]
    assert rules.normalize_scopes(["gateway.read", "gateway:read"], "s", ["*"]) == ["gateway:read"]
    assert rules.normalize_scopes(["*", "keys:write"], "s", ["*"]) == ["*"]
    for bad in ("gateway", "gateway:delete", "mail:read", "gateway:"):
        with pytest.raises(InvalidArgument):
            rules.normalize_scopes([bad], "s", ["*"])


@pytest.mark.parametrize(
    ("held", "requested", "ok"),
    [
        ({"*"}, ["gateway:read", "keys:write"], True),
        (set(), ["audit:read"], True),  # no scopes = everything the roles allow
        ({"gateway:read"}, ["gateway:read"], True),
        ({"gateway.read"}, ["gateway:read"], True),
        ({"gateway:read"}, ["gateway:write"], False),
        ({"gateway:read"}, ["*"], False),
    ],
)
def test_scopes_can_only_be_narrowed(held: set[str], requested: list[str], ok: bool) -> None:
    if ok:
        rules.check_scope_subset(requested, held, "you")
    else:
        with pytest.raises(PermissionDenied):
            rules.check_scope_subset(requested, held, "you")


def test_update_masks_list_only_updatable_fields() -> None:
    assert rules.check_update_mask(["display_name", "scopes"], rules.KEY_UPDATE_PATHS) == {
        "display_name",
        "scopes",
    }
    for paths in ([], ["*"], ["state"], ["name"], ["display_name", "owner"]):
        with pytest.raises(InvalidArgument):
            rules.check_update_mask(paths, rules.KEY_UPDATE_PATHS)
    with pytest.raises(InvalidArgument):
        rules.check_update_mask(["scopes"], rules.TENANT_UPDATE_PATHS)


def _d(seconds: int) -> Duration:
    return Duration(seconds=seconds)


def test_grace_period_and_token_ttl_bounds() -> None:
    grace = (rules.DEFAULT_GRACE, rules.MAX_GRACE, "grace_period")
    assert rules.duration(None, *grace, zero_ok=True) == timedelta(hours=24)
    assert rules.duration(_d(0), *grace, zero_ok=True) == timedelta(0)
    assert rules.duration(_d(30 * 86400), *grace, zero_ok=True) == timedelta(days=30)
    with pytest.raises(InvalidArgument):
        rules.duration(_d(30 * 86400 + 1), *grace, zero_ok=True)
    with pytest.raises(InvalidArgument):
        rules.duration(_d(-1), *grace, zero_ok=True)
    ttl = (rules.DEFAULT_TOKEN_TTL, rules.MAX_TOKEN_TTL, "ttl")
    assert rules.duration(None, *ttl, zero_ok=False) == timedelta(minutes=10)
    with pytest.raises(InvalidArgument):
        rules.duration(_d(0), *ttl, zero_ok=False)
    with pytest.raises(InvalidArgument):
        rules.duration(_d(3601), *ttl, zero_ok=False)


def test_tuples() -> None:
    assert rules.check_subject("user:alice", "s") == "user:alice"
    assert rules.check_subject("key:abcdefghijklmn23", "s")
    for bad in ("alice", "group:x", "key:short", "user:", "user:a b"):
        with pytest.raises(InvalidArgument):
            rules.check_subject(bad, "s")
    assert rules.check_object("capsule:hello", "o") == "capsule:hello"
    with pytest.raises(InvalidArgument):
        rules.check_object("acme", "o")
    assert rules.check_relation("approver", "tenant:acme", "r") == "approver"
    assert rules.check_relation("owner", "capsule:x", "r") == "owner"
    with pytest.raises(InvalidArgument):
        rules.check_relation("owner", "tenant:acme", "r")
    with pytest.raises(InvalidArgument):
        rules.check_relation("member", rules.PLATFORM_OBJECT, "r")


def test_admin_roles() -> None:
    assert rules.is_admin({"admin"}) and rules.is_admin({"platform_admin", "member"})
    assert not rules.is_admin({"member", "approver", "auditor"})


@pytest.mark.parametrize(
    ("key_roles", "key_scopes", "caller_roles", "caller_scopes", "ok"),
    [
        (["member"], ["*"], {"member"}, {"*"}, True),
        (["admin"], ["*"], {"member"}, {"*"}, False),  # a member key cannot rotate an admin key
        (["platform_admin"], ["*"], {"admin"}, {"*"}, False),
        (["admin", "platform_admin"], ["*"], {"platform_admin"}, {"*"}, True),
        (["member"], ["*"], {"admin"}, {"gateway:read"}, False),  # scopes beyond the caller's
        (["member"], ["gateway:read"], {"member"}, {"gateway:read", "keys:write"}, True),
        (["member"], [], {"member"}, {"gateway:read"}, False),  # no scopes = all
    ],
)
def test_only_keys_within_the_callers_power_can_be_changed(
    key_roles: list[str],
    key_scopes: list[str],
    caller_roles: set[str],
    caller_scopes: set[str],
    ok: bool,
) -> None:
    assert rules.within_power(key_roles, key_scopes, caller_roles, caller_scopes) is ok
