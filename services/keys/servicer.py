"""KeysService: API keys, tokens, JWKS, tenants and role bindings.

Who may do what (on top of the policy the authz interceptor applies per method):

* Every call is scoped to the caller's tenant; `platform_admin` reaches other tenants only
  through the tenant methods (Create/Get/List/UpdateTenant).
* Tenant admins (`admin` or `platform_admin`) see every key of their tenant. Anyone else sees
  the keys they own, plus the key they call with. A key's owner is the owner of the credential
  that created it (`principal.owner`, else its subject), so keys made with alice's key belong
  to alice.
* Changing a visible key (update, revoke, rotate) also needs the key to grant nothing beyond
  the caller's credential (roles it may grant, scopes it holds), except the caller's own key:
  otherwise a member key made by an admin could rotate the admin's key and receive its secret.
* A read of a key the caller may not see is NOT_FOUND (no existence leak). A write to one is
  PERMISSION_DENIED, decided before existence: a name that is not a key the caller may manage
  is refused the same way whether it exists in another tenant or nowhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf import empty_pb2
from grpc import aio

from services.common import apikeys, paging
from services.common.auth import revocation
from services.common.auth.principal import Principal, current_principal, require_principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from services.common.events import Bus
from services.common.names import check_request_id
from services.keys import rules
from services.keys.directory import Directory, binding_from_row
from services.keys.store import REVOKED, KeyStore, NewKey, Row, key_from_row
from services.keys.tokens import TransitSigner, build_claims, jwks_message
from soma.keys.v1 import keys_pb2, keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

BINDINGS_CHANGED = "bindings.changed"

KeyVerifier = Callable[[str], Awaitable[Principal]]


def caller_owner(principal: Principal) -> str:
    return principal.owner or principal.subject


def can_see(principal: Principal, row: Row) -> bool:
    return (
        rules.is_admin(principal.roles)
        or row["owner"] == caller_owner(principal)
        or row["id"] == principal.key_id
    )


def can_change(principal: Principal, row: Row) -> bool:
    return row["id"] == principal.key_id or rules.within_power(
        row["roles"], row["scopes"], principal.roles, principal.scopes
    )


def _metadata_key(context: aio.ServicerContext) -> str | None:
    for item in context.invocation_metadata() or ():
        value = item.value if isinstance(item.value, str) else None
        if value is None:
            continue
        if item.key == "authorization":
            scheme, _, credential = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
        elif item.key == "x-api-key" and value.strip():
            return value.strip()
    return None


def _timestamp(value: Any, field: str, *, future: bool) -> datetime | None:
    when: datetime = value.ToDatetime(tzinfo=UTC)
    if future and when <= datetime.now(UTC):
        raise InvalidArgument(f"{field} must be in the future", field=field)
    return when


class KeysServicer(keys_pb2_grpc.KeysServiceServicer):
    def __init__(
        self,
        keys: KeyStore,
        directory: Directory,
        bus: Bus,
        signer: TransitSigner,
        *,
        pepper: bytes,
        env: str,
        issuer: str,
        audiences: tuple[str, ...],
        verify_api_key: KeyVerifier,
    ) -> None:
        self.keys = keys
        self.directory = directory
        self.bus = bus
        self.signer = signer
        self._pepper = pepper
        self.env = env
        self.issuer = issuer
        self.audiences = audiences
        self.verify_api_key = verify_api_key

    # -- helpers ------------------------------------------------------------------------------

    def _write_check(self, principal: Principal, key_id: str) -> Callable[[Row | None], None]:
        def check(row: Row | None) -> None:
            if row is None or not can_see(principal, row):
                raise PermissionDenied(
                    f"you cannot change key keys/{key_id}: it is not a key of tenant "
                    f"{principal.tenant} that you manage",
                    reason="KEY_NOT_MANAGEABLE",
                )
            if not can_change(principal, row):
                raise PermissionDenied(
                    f"you cannot change key keys/{key_id}: it holds roles or scopes your "
                    "credential does not",
                    reason="KEY_MORE_PRIVILEGED",
                )

        return check

    async def _publish(self, subject: str, key_id: str) -> None:
        try:
            await revocation.publish_key_change(self.bus, subject, key_id)
        except Exception as error:  # committed already; the caches' TTL is the backstop
            log.warning("could not publish %s for key %s: %s", subject, key_id, error)

    async def _publish_binding(self, tenant: str, subject: str, relation: str, obj: str) -> None:
        payload = {"tenant": tenant, "subject": subject, "relation": relation, "object": obj}
        try:
            await self.bus.nc.publish(BINDINGS_CHANGED, json.dumps(payload).encode())
        except Exception as error:
            log.warning("could not publish %s: %s", BINDINGS_CHANGED, error)

    def _key(self, row: Row) -> pb.ApiKey:
        return key_from_row(row, self.env)

    # -- API keys -----------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: keys_pb2.CreateApiKeyRequest, context: aio.ServicerContext
    ) -> keys_pb2.CreateApiKeyResponse:
        principal = require_principal()
        if not request.HasField("api_key"):
            raise InvalidArgument("api_key is required (it may be empty: {})", field="api_key")
        spec = request.api_key
        request_id = check_request_id(request.request_id)
        roles = rules.normalize_roles(spec.roles, "api_key.roles")
        rules.check_grantable_roles(roles, principal.roles)
        scopes = rules.normalize_scopes(
            spec.scopes, "api_key.scopes", sorted(principal.scopes) or rules.DEFAULT_SCOPES
        )
        rules.check_scope_subset(scopes, principal.scopes, "your credential")
        generated = apikeys.generate(self.env)
        row, created = await self.keys.create(
            NewKey(
                key_id=generated.key_id,
                tenant=principal.tenant,
                owner=caller_owner(principal),
                display_name=rules.check_display_name(spec.display_name, "api_key.display_name"),
                scopes=scopes,
                roles=roles,
                secret_hash=apikeys.hash_secret(self._pepper, generated.secret),
                expire_time=_timestamp(spec.expire_time, "api_key.expire_time", future=True)
                if spec.HasField("expire_time")
                else None,
                usage_budget=rules.check_non_negative(spec.usage_budget, "api_key.usage_budget"),
                rate_limit_per_minute=rules.check_non_negative(
                    spec.rate_limit_per_minute, "api_key.rate_limit_per_minute"
                ),
                request_id=request_id,
            )
        )
        if not created:
            if not can_see(principal, row):
                raise InvalidArgument(
                    f"request_id {request_id} was already used for a different request",
                    field="request_id",
                )
            # A repeat: the same key, never its secret again.
            return keys_pb2.CreateApiKeyResponse(api_key=self._key(row))
        log.info("created key %s in tenant %s for %s", row["id"], row["tenant"], row["owner"])
        return keys_pb2.CreateApiKeyResponse(api_key=self._key(row), secret=generated.secret)

    async def GetApiKey(
        self, request: keys_pb2.GetApiKeyRequest, context: aio.ServicerContext
    ) -> pb.ApiKey:
        principal = require_principal()
        key_id = rules.parse_key_name(request.name)
        row = await self.keys.get(principal.tenant, key_id)
        if row is None or not can_see(principal, row):
            raise NotFound(f"key keys/{key_id} does not exist")
        return self._key(row)

    async def ListApiKeys(
        self, request: keys_pb2.ListApiKeysRequest, context: aio.ServicerContext
    ) -> keys_pb2.ListApiKeysResponse:
        principal = require_principal()
        if request.state not in pb.ApiKeyState.values():
            raise InvalidArgument(
                f"state {request.state} is not an ApiKeyState; leave it unset for all",
                field="state",
            )
        limit = paging.page_size(request.page_size)
        admin = rules.is_admin(principal.roles)
        query = {
            "method": "ListApiKeys",
            "state": int(request.state),
            "owner": request.owner,
            # A token of one caller's view must not page through another's.
            "view": "admin" if admin else caller_owner(principal),
        }
        before = paging.decode_pos(request.page_token, query)
        rows, last_pos = await self.keys.list(
            principal.tenant,
            state=int(request.state),
            owner=request.owner,
            only_owner=None if admin else caller_owner(principal),
            also_key=principal.key_id,
            before_pos=before,
            limit=limit,
        )
        token = paging.encode_pos(last_pos, query)
        return keys_pb2.ListApiKeysResponse(
            api_keys=[self._key(r) for r in rows], next_page_token=token
        )

    async def UpdateApiKey(
        self, request: keys_pb2.UpdateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.ApiKey:
        principal = require_principal()
        if not request.HasField("api_key"):
            raise InvalidArgument("api_key is required, with its name", field="api_key")
        key_id = rules.parse_key_name(request.api_key.name, "api_key.name")
        paths = rules.check_update_mask(request.update_mask.paths, rules.KEY_UPDATE_PATHS)
        request_id = check_request_id(request.request_id)
        spec = request.api_key
        values: dict[str, Any] = {}
        if "display_name" in paths:
            values["display_name"] = rules.check_display_name(
                spec.display_name, "api_key.display_name"
            )
        if "roles" in paths:
            roles = rules.normalize_roles(spec.roles, "api_key.roles")
            rules.check_grantable_roles(roles, principal.roles)
            values["roles"] = roles
        if "scopes" in paths:
            scopes = rules.normalize_scopes(
                spec.scopes, "api_key.scopes", sorted(principal.scopes) or rules.DEFAULT_SCOPES
            )
            rules.check_scope_subset(scopes, principal.scopes, "your credential")
            values["scopes"] = scopes
        if "expire_time" in paths:
            values["expire_time"] = (
                _timestamp(spec.expire_time, "api_key.expire_time", future=True)
                if spec.HasField("expire_time")
                else None
            )
        if "usage_budget" in paths:
            budget = rules.check_non_negative(spec.usage_budget, "api_key.usage_budget")
            values["usage_budget"] = budget or None
        if "rate_limit_per_minute" in paths:
            limit = rules.check_non_negative(
                spec.rate_limit_per_minute, "api_key.rate_limit_per_minute"
            )
            values["rate_limit_per_minute"] = limit or None
        check = self._write_check(principal, key_id)

        async def apply(conn: asyncpg.Connection, row: Row) -> Row:
            if row["state"] == REVOKED:
                raise FailedPrecondition(
                    f"key keys/{key_id} is revoked; a revoked key cannot be changed",
                    reason="KEY_REVOKED",
                )
            return await KeyStore.update_fields(conn, key_id, values)

        row, changed = await self.keys.change(
            principal.tenant, key_id, check, "UpdateApiKey", request_id, apply
        )
        if changed:
            await self._publish(revocation.KEY_UPDATED, key_id)
        return self._key(row)

    async def RevokeApiKey(
        self, request: keys_pb2.RevokeApiKeyRequest, context: aio.ServicerContext
    ) -> pb.ApiKey:
        principal = require_principal()
        key_id = rules.parse_key_name(request.name)
        if len(request.reason) > rules.MAX_REASON:
            raise InvalidArgument(
                f"reason is at most {rules.MAX_REASON} characters", field="reason"
            )
        request_id = check_request_id(request.request_id)

        async def apply(conn: asyncpg.Connection, row: Row) -> Row | None:
            return await KeyStore.revoke(conn, row, request.reason)

        row, changed = await self.keys.change(
            principal.tenant,
            key_id,
            self._write_check(principal, key_id),
            "RevokeApiKey",
            request_id,
            apply,
        )
        if changed:
            log.info("revoked key %s of tenant %s", key_id, principal.tenant)
            await self._publish(revocation.KEY_REVOKED, key_id)
        return self._key(row)

    async def RotateApiKey(
        self, request: keys_pb2.RotateApiKeyRequest, context: aio.ServicerContext
    ) -> keys_pb2.RotateApiKeyResponse:
        principal = require_principal()
        key_id = rules.parse_key_name(request.name)
        grace = rules.duration(
            request.grace_period if request.HasField("grace_period") else None,
            rules.DEFAULT_GRACE,
            rules.MAX_GRACE,
            "grace_period",
            zero_ok=True,
        )
        request_id = check_request_id(request.request_id)
        generated = apikeys.generate(self.env, key_id)
        new_hash = apikeys.hash_secret(self._pepper, generated.secret)

        async def apply(conn: asyncpg.Connection, row: Row) -> Row:
            return await KeyStore.rotate(conn, row, new_hash, grace)

        row, changed = await self.keys.change(
            principal.tenant,
            key_id,
            self._write_check(principal, key_id),
            "RotateApiKey",
            request_id,
            apply,
        )
        if not changed:  # a repeat: nothing rotated, no secret
            return keys_pb2.RotateApiKeyResponse(api_key=self._key(row))
        log.info("rotated key %s (grace %ss)", key_id, int(grace.total_seconds()))
        await self._publish(revocation.KEY_ROTATED, key_id)
        return keys_pb2.RotateApiKeyResponse(api_key=self._key(row), secret=generated.secret)

    # -- tokens -------------------------------------------------------------------------------

    async def _token_principal(
        self, request: keys_pb2.IssueTokenRequest, context: Any
    ) -> Principal:
        if request.api_key:
            return await self.verify_api_key(request.api_key)
        current = current_principal.get()
        if current is not None:
            # The interceptor already verified (and charged) the header credential.
            if current.credential != "api_key":
                raise InvalidArgument(
                    "IssueToken exchanges an API key, not a token: send the API key in "
                    "api_key, authorization: Bearer or x-api-key",
                    field="api_key",
                )
            return current
        header_key = _metadata_key(context)
        if header_key is None:
            raise Unauthenticated(
                "missing credentials: send the API key in api_key, authorization: Bearer "
                "<api key> or x-api-key",
                reason="CREDENTIALS_MISSING",
            )
        if not apikeys.looks_like_key(header_key):
            raise InvalidArgument("IssueToken exchanges an API key, not a token", field="api_key")
        return await self.verify_api_key(header_key)

    async def IssueToken(
        self, request: keys_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> keys_pb2.IssueTokenResponse:
        audience = request.audience or self.audiences[0]
        if audience not in self.audiences:
            raise InvalidArgument(
                f"audience {audience[:100]!r} is not accepted; use one of "
                f"{', '.join(self.audiences)} (or leave it empty)",
                field="audience",
            )
        ttl = rules.duration(
            request.ttl if request.HasField("ttl") else None,
            rules.DEFAULT_TOKEN_TTL,
            rules.MAX_TOKEN_TTL,
            "ttl",
            zero_ok=False,
        )
        ttl_seconds = max(int(ttl.total_seconds()), 1)
        principal = await self._token_principal(request, context)
        if request.scopes:
            scopes = rules.normalize_scopes(request.scopes, "scopes", ())
            rules.check_scope_subset(scopes, principal.scopes, "the API key")
        else:
            scopes = sorted(principal.scopes) or [rules.ALL_SCOPES]
        now = int(datetime.now(UTC).timestamp())
        claims = build_claims(
            principal,
            issuer=self.issuer,
            audience=audience,
            scopes=scopes,
            now=now,
            ttl_seconds=ttl_seconds,
        )
        token, kid = await self.signer.sign(claims)
        log.info("issued a token (%s, %ds) for key %s", kid, ttl_seconds, principal.key_id)
        response = keys_pb2.IssueTokenResponse(
            access_token=token, token_type="Bearer", expires_in=ttl_seconds
        )
        response.expire_time.FromDatetime(datetime.fromtimestamp(claims["exp"], UTC))
        return response

    async def GetJwks(
        self, request: keys_pb2.GetJwksRequest, context: aio.ServicerContext
    ) -> pb.JsonWebKeySet:
        return jwks_message(await self.signer.jwks())

    # -- tenants ------------------------------------------------------------------------------

    async def CreateTenant(
        self, request: keys_pb2.CreateTenantRequest, context: aio.ServicerContext
    ) -> pb.Tenant:
        principal = require_principal()
        if rules.PLATFORM_ADMIN not in principal.roles:
            raise PermissionDenied(
                "only a platform admin can create tenants", reason="PLATFORM_ADMIN_ONLY"
            )
        tenant_id = rules.check_tenant_id(request.tenant_id)
        spec = request.tenant
        admin_subject = (
            rules.check_subject(request.admin_subject, "admin_subject")
            if request.admin_subject
            else ""
        )
        tenant = await self.directory.create_tenant(
            caller_tenant=principal.tenant,
            creator=principal.subject,
            tenant_id=tenant_id,
            display_name=rules.check_display_name(spec.display_name, "tenant.display_name"),
            enterprise_mode=spec.enterprise_mode,
            admin_subject=admin_subject,
            request_id=check_request_id(request.request_id),
        )
        if admin_subject:
            await self._publish_binding(tenant_id, admin_subject, "admin", f"tenant:{tenant_id}")
        return tenant

    async def GetTenant(
        self, request: keys_pb2.GetTenantRequest, context: aio.ServicerContext
    ) -> pb.Tenant:
        principal = require_principal()
        tenant_id = rules.parse_tenant_name(request.name)
        if tenant_id != principal.tenant and rules.PLATFORM_ADMIN not in principal.roles:
            raise NotFound(f"tenant tenants/{tenant_id} does not exist")
        return await self.directory.get_tenant(tenant_id)

    async def ListTenants(
        self, request: keys_pb2.ListTenantsRequest, context: aio.ServicerContext
    ) -> keys_pb2.ListTenantsResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        platform = rules.PLATFORM_ADMIN in principal.roles
        query = {"method": "ListTenants", "view": "platform" if platform else principal.tenant}
        position = paging.decode_token(request.page_token, query)
        tenants, last = await self.directory.list_tenants(
            None if platform else principal.tenant,
            str(position["id"]) if position else None,
            limit,
        )
        token = paging.encode_token({"id": last}, query) if last is not None else ""
        return keys_pb2.ListTenantsResponse(tenants=tenants, next_page_token=token)

    async def UpdateTenant(
        self, request: keys_pb2.UpdateTenantRequest, context: aio.ServicerContext
    ) -> pb.Tenant:
        principal = require_principal()
        if not request.HasField("tenant"):
            raise InvalidArgument("tenant is required, with its name", field="tenant")
        tenant_id = rules.parse_tenant_name(request.tenant.name, "tenant.name")
        platform = rules.PLATFORM_ADMIN in principal.roles
        if not platform and (tenant_id != principal.tenant or not rules.is_admin(principal.roles)):
            raise PermissionDenied(
                f"you cannot change tenant tenants/{tenant_id}: only its admins can",
                reason="TENANT_ADMIN_ONLY",
            )
        paths = rules.check_update_mask(request.update_mask.paths, rules.TENANT_UPDATE_PATHS)
        values: dict[str, Any] = {}
        if "display_name" in paths:
            values["display_name"] = rules.check_display_name(
                request.tenant.display_name, "tenant.display_name"
            )
        if "enterprise_mode" in paths:
            values["enterprise_mode"] = request.tenant.enterprise_mode
        return await self.directory.update_tenant(
            caller_tenant=principal.tenant,
            tenant_id=tenant_id,
            values=values,
            request_id=check_request_id(request.request_id),
        )

    # -- role bindings ------------------------------------------------------------------------

    def _require_tenant_admin(self, principal: Principal, what: str) -> None:
        if not rules.is_admin(principal.roles):
            raise PermissionDenied(
                f"only tenant admins can {what} role bindings", reason="TENANT_ADMIN_ONLY"
            )

    async def _check_object(self, principal: Principal, subject: str, obj: str) -> None:
        """The tuple must stay inside the caller's tenant (PERMISSION_DENIED otherwise)."""
        if obj == rules.PLATFORM_OBJECT:
            if rules.PLATFORM_ADMIN not in principal.roles:
                raise PermissionDenied(
                    "only a platform admin can bind platform roles", reason="PLATFORM_ADMIN_ONLY"
                )
        elif obj.startswith("tenant:"):
            if obj != f"tenant:{principal.tenant}":
                raise PermissionDenied(
                    f"object {obj[:100]!r} is not your tenant (tenant:{principal.tenant})",
                    reason="CROSS_TENANT",
                )
        elif not await self.directory.owns(principal.tenant, obj):
            raise PermissionDenied(
                f"object {obj[:100]!r} does not belong to tenant {principal.tenant}",
                reason="CROSS_TENANT",
            )
        if subject.startswith("key:") and not await self.directory.key_in_tenant(
            principal.tenant, subject[4:]
        ):
            raise InvalidArgument(
                f"role_binding.subject {subject} is not a key of tenant {principal.tenant}",
                field="role_binding.subject",
            )

    async def CreateRoleBinding(
        self, request: keys_pb2.CreateRoleBindingRequest, context: aio.ServicerContext
    ) -> pb.RoleBinding:
        principal = require_principal()
        self._require_tenant_admin(principal, "create")
        if not request.HasField("role_binding"):
            raise InvalidArgument("role_binding is required", field="role_binding")
        spec = request.role_binding
        subject = rules.check_subject(spec.subject, "role_binding.subject")
        obj = rules.check_object(spec.object, "role_binding.object")
        relation = rules.check_relation(spec.relation, obj, "role_binding.relation")
        request_id = check_request_id(request.request_id)
        await self._check_object(principal, subject, obj)
        binding = await self.directory.create_binding(
            tenant=principal.tenant,
            subject=subject,
            relation=relation,
            obj=obj,
            creator=principal.subject,
            request_id=request_id,
        )
        await self._publish_binding(principal.tenant, subject, relation, obj)
        return binding

    async def GetRoleBinding(
        self, request: keys_pb2.GetRoleBindingRequest, context: aio.ServicerContext
    ) -> pb.RoleBinding:
        principal = require_principal()
        binding_id = rules.parse_binding_name(request.name)
        row = await self.directory.get_binding(principal.tenant, binding_id)
        if row is None:
            raise NotFound(f"role binding roleBindings/{binding_id} does not exist")
        return binding_from_row(row)

    async def ListRoleBindings(
        self, request: keys_pb2.ListRoleBindingsRequest, context: aio.ServicerContext
    ) -> keys_pb2.ListRoleBindingsResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        query = {
            "method": "ListRoleBindings",
            "subject": request.subject,
            "relation": request.relation,
            "object": request.object,
        }
        after = paging.decode_pos(request.page_token, query)
        bindings, last = await self.directory.list_bindings(
            principal.tenant,
            subject=request.subject,
            relation=request.relation,
            obj=request.object,
            after_pos=after,
            limit=limit,
        )
        token = paging.encode_pos(last, query)
        return keys_pb2.ListRoleBindingsResponse(role_bindings=bindings, next_page_token=token)

    async def DeleteRoleBinding(
        self, request: keys_pb2.DeleteRoleBindingRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        principal = require_principal()
        binding_id = rules.parse_binding_name(request.name)
        request_id = check_request_id(request.request_id)

        def check(row: Row | None) -> None:
            if row is None or not rules.is_admin(principal.roles):
                raise PermissionDenied(
                    f"you cannot delete roleBindings/{binding_id}: it is not a binding of "
                    f"tenant {principal.tenant} that you manage",
                    reason="TENANT_ADMIN_ONLY",
                )
            if row["object"] == rules.PLATFORM_OBJECT and (
                rules.PLATFORM_ADMIN not in principal.roles
            ):
                raise PermissionDenied(
                    "only a platform admin can remove platform roles",
                    reason="PLATFORM_ADMIN_ONLY",
                )

        row = await self.directory.delete_binding(principal.tenant, binding_id, request_id, check)
        if row is not None:
            await self._publish_binding(
                principal.tenant, row["subject"], row["relation"], row["object"]
            )
        return empty_pb2.Empty()

    async def ping(self) -> None:
        await self.keys.ping()
