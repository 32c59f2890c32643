"""Tenants (auth_tenants) and role bindings (auth_role_bindings, relationship tuples).

Plain SQL: authorization reads the same tuples through services.common.auth.relations; this
module only writes them and serves the CRUD methods.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from services.common import paging
from services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from services.common.timestamps import to_timestamp
from services.keys.rules import PLATFORM_OBJECT
from services.keys.store import claim_request
from soma.keys.v1 import resources_pb2 as pb

Row = Mapping[str, Any]


def tenant_from_row(row: Row) -> pb.Tenant:
    return pb.Tenant(
        name=f"tenants/{row['id']}",
        tenant=row["id"],
        display_name=row["display_name"],
        enterprise_mode=row["enterprise_mode"],
        create_time=to_timestamp(row["create_time"]),
        update_time=to_timestamp(row["update_time"]),
    )


def binding_from_row(row: Row) -> pb.RoleBinding:
    return pb.RoleBinding(
        name=f"roleBindings/{row['id']}",
        tenant=row["tenant"],
        subject=row["subject"],
        relation=row["relation"],
        object=row["object"],
        creator=row.get("creator") or "",
        create_time=to_timestamp(row["create_time"]),
    )


def _missing_tenant(tenant_id: str) -> NotFound:
    return NotFound(f"tenant tenants/{tenant_id} does not exist")


class Directory:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- tenants ------------------------------------------------------------------------------

    async def create_tenant(
        self,
        *,
        caller_tenant: str,
        creator: str,
        tenant_id: str,
        display_name: str,
        enterprise_mode: bool,
        admin_subject: str,
        request_id: str,
    ) -> pb.Tenant:
        async with self.pool.acquire() as conn, conn.transaction():
            name = f"tenants/{tenant_id}"
            if not await claim_request(conn, caller_tenant, request_id, "CreateTenant", name):
                row = await conn.fetchrow("SELECT * FROM auth_tenants WHERE id = $1", tenant_id)
                if row is None:
                    raise _missing_tenant(tenant_id)
                return tenant_from_row(row)
            row = await conn.fetchrow(
                """INSERT INTO auth_tenants (id, display_name, enterprise_mode)
                   VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING *""",
                tenant_id,
                display_name,
                enterprise_mode,
            )
            if row is None:
                raise AlreadyExists(f"tenant {name} already exists", reason="TENANT_EXISTS")
            if admin_subject:
                await conn.execute(
                    """INSERT INTO auth_role_bindings
                           (id, tenant, subject, relation, object, creator)
                       VALUES ($1, $2, $3, 'admin', $4, $5) ON CONFLICT DO NOTHING""",
                    uuid.uuid4(),
                    tenant_id,
                    admin_subject,
                    f"tenant:{tenant_id}",
                    creator,
                )
            return tenant_from_row(row)

    async def get_tenant(self, tenant_id: str) -> pb.Tenant:
        row = await self.pool.fetchrow("SELECT * FROM auth_tenants WHERE id = $1", tenant_id)
        if row is None:
            raise _missing_tenant(tenant_id)
        return tenant_from_row(row)

    async def list_tenants(
        self, only: str | None, after_id: str | None, limit: int
    ) -> tuple[list[pb.Tenant], str | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM auth_tenants
               WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR id > $2)
               ORDER BY id LIMIT $3""",
            only,
            after_id,
            limit + 1,
        )
        page, last = paging.split_page(rows, limit, "id")
        return [tenant_from_row(r) for r in page], last

    async def update_tenant(
        self,
        *,
        caller_tenant: str,
        tenant_id: str,
        values: Mapping[str, Any],
        request_id: str,
    ) -> pb.Tenant:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM auth_tenants WHERE id = $1 FOR UPDATE", tenant_id
            )
            if row is None:
                raise _missing_tenant(tenant_id)
            name = f"tenants/{tenant_id}"
            if not await claim_request(conn, caller_tenant, request_id, "UpdateTenant", name):
                return tenant_from_row(row)
            args: list[Any] = [tenant_id]
            sets = []
            for column, value in values.items():
                args.append(value)
                sets.append(f"{column} = ${len(args)}")
            row = await conn.fetchrow(
                f"UPDATE auth_tenants SET {', '.join(sets)}, update_time = now() "
                "WHERE id = $1 RETURNING *",
                *args,
            )
            return tenant_from_row(row)

    # -- role bindings ------------------------------------------------------------------------

    async def owns(self, tenant: str, obj: str) -> bool:
        """Whether `tenant:<tenant> owner <obj>` exists (services write these tuples)."""
        return bool(
            await self.pool.fetchval(
                """SELECT true FROM auth_role_bindings
                   WHERE subject = $1 AND relation = 'owner' AND object = $2 AND tenant = $3""",
                f"tenant:{tenant}",
                obj,
                tenant,
            )
        )

    async def key_in_tenant(self, tenant: str, key_id: str) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT true FROM auth_api_keys WHERE id = $1 AND tenant = $2", key_id, tenant
            )
        )

    async def create_binding(
        self,
        *,
        tenant: str,
        subject: str,
        relation: str,
        obj: str,
        creator: str,
        request_id: str,
    ) -> pb.RoleBinding:
        binding_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            tuple_name = f"{subject} {relation} {obj}"
            if not await claim_request(conn, tenant, request_id, "CreateRoleBinding", tuple_name):
                row = await conn.fetchrow(
                    """SELECT * FROM auth_role_bindings
                       WHERE subject = $1 AND relation = $2 AND object = $3 AND tenant = $4""",
                    subject,
                    relation,
                    obj,
                    tenant,
                )
                if row is None:
                    raise NotFound(f"role binding {tuple_name!r} no longer exists")
                return binding_from_row(row)
            row = await conn.fetchrow(
                """INSERT INTO auth_role_bindings (id, tenant, subject, relation, object, creator)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING *""",
                binding_id,
                tenant,
                subject,
                relation,
                obj,
                creator,
            )
            if row is None:
                raise AlreadyExists(
                    f"role binding {tuple_name!r} already exists", reason="BINDING_EXISTS"
                )
            return binding_from_row(row)

    async def get_binding(self, tenant: str, binding_id: str) -> Row | None:
        return await self.pool.fetchrow(
            "SELECT * FROM auth_role_bindings WHERE id = $1 AND tenant = $2",
            uuid.UUID(binding_id),
            tenant,
        )

    async def list_bindings(
        self,
        tenant: str,
        *,
        subject: str,
        relation: str,
        obj: str,
        after_pos: int | None,
        limit: int,
    ) -> tuple[list[pb.RoleBinding], int | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM auth_role_bindings
               WHERE tenant = $1 AND ($2 = '' OR subject = $2) AND ($3 = '' OR relation = $3)
                 AND ($4 = '' OR object = $4) AND ($5::bigint IS NULL OR pos > $5)
               ORDER BY pos LIMIT $6""",
            tenant,
            subject,
            relation,
            obj,
            after_pos,
            limit + 1,
        )
        page, last = paging.split_page(rows, limit, "pos")
        return [binding_from_row(r) for r in page], last

    async def delete_binding(
        self, tenant: str, binding_id: str, request_id: str, check: Any
    ) -> Row | None:
        """Deletes the binding; returns it, or None for a repeated request id. `check(row)`
        runs on the locked row (None if the tenant has no such binding)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM auth_role_bindings WHERE id = $1 AND tenant = $2 FOR UPDATE",
                uuid.UUID(binding_id),
                tenant,
            )
            name = f"roleBindings/{binding_id}"
            # A repeat of a delete that succeeded finds nothing left: answer as the first did.
            # (A refused first attempt rolled its claim back, so it is not a repeat.)
            if not await claim_request(conn, tenant, request_id, "DeleteRoleBinding", name):
                return None
            check(row)
            assert row is not None
            if row["relation"] == "admin" and row["object"] == f"tenant:{tenant}":
                # Lock every admin binding of the tenant so two deletes cannot both pass.
                admins = await conn.fetch(
                    """SELECT id FROM auth_role_bindings
                       WHERE object = $1 AND relation = 'admin' FOR UPDATE""",
                    row["object"],
                )
                if len(admins) <= 1:
                    raise FailedPrecondition(
                        f"{row['subject']} is the last admin of tenant {tenant}; bind another "
                        "admin first",
                        reason="LAST_ADMIN",
                    )
            if row["object"] == PLATFORM_OBJECT:
                admins = await conn.fetch(
                    """SELECT id FROM auth_role_bindings
                       WHERE object = $1 AND relation = 'admin' FOR UPDATE""",
                    PLATFORM_OBJECT,
                )
                if len(admins) <= 1:
                    raise FailedPrecondition(
                        "this is the last platform admin binding; bind another one first",
                        reason="LAST_ADMIN",
                    )
            await conn.execute("DELETE FROM auth_role_bindings WHERE id = $1", row["id"])
            return row
