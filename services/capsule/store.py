"""The registry's metadata in PostgreSQL: capsules, versions, publisher keys, installations,
approvals and request ids (migrations/0001_capsule.sql).

Every tenant-scoped read is filtered by tenant. Changes that must not interleave lock what they
change (`FOR UPDATE`), and everything that changes which installation of a capsule is current
for a tenant (activate, uninstall, the start-up reconciliation) takes one advisory lock per
(tenant, capsule), so two replicas never race on the same install directory.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import status_pb2

from services.capsule.errors import Failure, status_of
from services.capsule.manifest import SemverKey
from services.common import db, paging
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
)
from services.common.timestamps import to_timestamp
from soma.capsule.v1 import capsule_pb2
from soma.capsule.v1 import resources_pb2 as pb

MIGRATIONS = Path(__file__).parent / "migrations"

Row = Mapping[str, Any]

PRIVATE = pb.CAPSULE_VISIBILITY_PRIVATE
PUBLIC = pb.CAPSULE_VISIBILITY_PUBLIC
KEY_ACTIVE = pb.PUBLISHER_KEY_STATE_ACTIVE
KEY_REVOKED = pb.PUBLISHER_KEY_STATE_REVOKED
VERIFIED = pb.VERIFICATION_RESULT_VERIFIED

PENDING = pb.INSTALLATION_STATE_PENDING
AWAITING = pb.INSTALLATION_STATE_AWAITING_APPROVAL
INSTALLED = pb.INSTALLATION_STATE_INSTALLED
FAILED = pb.INSTALLATION_STATE_FAILED
REJECTED = pb.INSTALLATION_STATE_REJECTED
SUPERSEDED = pb.INSTALLATION_STATE_SUPERSEDED
UNINSTALLED = pb.INSTALLATION_STATE_UNINSTALLED
RUNNING_STATES = (PENDING, AWAITING)

APPROVAL_PENDING = pb.APPROVAL_STATE_PENDING
APPROVAL_APPROVED = pb.APPROVAL_STATE_APPROVED
APPROVAL_REJECTED = pb.APPROVAL_STATE_REJECTED
APPROVAL_EXPIRED = pb.APPROVAL_STATE_EXPIRED

PHASE_DONE = pb.INSTALL_PHASE_DONE
PHASE_FAILED = pb.INSTALL_PHASE_FAILED
PHASE_AWAITING = pb.INSTALL_PHASE_AWAITING_APPROVAL

REQUESTS_TABLE = "capsule_requests"
FAILED_PRECONDITION_CODE = grpc.StatusCode.FAILED_PRECONDITION.value[0]


# -- conversions ---------------------------------------------------------------------------


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def manifest_data(row: Row) -> dict[str, Any]:
    """A version row's manifest as a dict (jsonb arrives as text)."""
    data = _json(row["manifest"])
    return data if isinstance(data, dict) else {}


def capsule_from_row(row: Row) -> pb.Capsule:
    return pb.Capsule(
        name=f"capsules/{row['name']}",
        tenant=row["tenant"],
        description=row["description"],
        latest_version=row["latest_version"],
        install_count=row["install_count"],
        verified=row["verified"],
        permissions=list(row["permissions"]),
        homepage=row["homepage"],
        license=row["license"],
        visibility=row["visibility"],
        create_time=to_timestamp(row["create_time"]),
        update_time=to_timestamp(row["update_time"]),
    )


def manifest_from_json(value: Any) -> pb.CapsuleManifest:
    data = _json(value)
    return pb.CapsuleManifest(
        name=data.get("name", ""),
        version=data.get("version", ""),
        description=data.get("description", ""),
        publisher=data.get("publisher", ""),
        entrypoint=data.get("entrypoint", ""),
        permissions=list(data.get("permissions", [])),
        homepage=data.get("homepage", ""),
        license=data.get("license", ""),
    )


def signature_from_row(row: Row) -> pb.CapsuleSignature:
    return pb.CapsuleSignature(
        format=row["signature_format"],
        algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256,
        signature=row["signature"],
        publisher_key=f"publisherKeys/{row['publisher_key']}" if row["publisher_key"] else "",
        key_fingerprint=row["key_fingerprint"],
        result=row["verify_result"],
        verify_time=to_timestamp(row["verify_time"]),
    )


def version_name(capsule: str, version: str) -> str:
    return f"capsules/{capsule}/versions/{version}"


def version_from_row(row: Row) -> pb.CapsuleVersion:
    return pb.CapsuleVersion(
        name=version_name(row["capsule"], row["version"]),
        tenant=row["tenant"],
        version=row["version"],
        digest=row["digest"],
        size_bytes=row["size_bytes"],
        entry_count=row["entry_count"],
        uncompressed_size_bytes=row["unpacked_bytes"],
        manifest=manifest_from_json(row["manifest"]),
        signature=signature_from_row(row),
        yanked=row["yanked"],
        yank_reason=row["yank_reason"],
        yank_time=to_timestamp(row["yank_time"]),
        uploader=row["uploader"],
        publish_time=to_timestamp(row["publish_time"]),
    )


def key_from_row(row: Row) -> pb.PublisherKey:
    return pb.PublisherKey(
        name=f"publisherKeys/{row['id']}",
        tenant=row["tenant"],
        display_name=row["display_name"],
        public_key_pem=row["public_key_pem"],
        fingerprint=row["fingerprint"],
        algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256,
        state=row["state"],
        creator=row["creator"],
        create_time=to_timestamp(row["create_time"]),
        revoke_time=to_timestamp(row["revoke_time"]),
    )


def error_status(row: Row) -> status_pb2.Status | None:
    """The stored error as google.rpc.Status (with its ErrorInfo reason), or None."""
    if not row["error_code"]:
        return None
    return status_of(row["error_code"], row["error_message"], row["error_reason"])


def installation_from_row(row: Row) -> pb.Installation:
    out = pb.Installation(
        name=f"installations/{row['id']}",
        tenant=row["tenant"],
        capsule=f"capsules/{row['capsule']}",
        version=row["version"],
        digest=row["digest"],
        requester=row["requester"],
        state=row["state"],
        approval=f"approvals/{row['approval']}" if row["approval"] else "",
        path=row["path"],
        file_count=row["file_count"],
        size_bytes=row["size_bytes"],
        error=error_status(row),
        create_time=to_timestamp(row["create_time"]),
        complete_time=to_timestamp(row["complete_time"]),
        remove_time=to_timestamp(row["remove_time"]),
        remover=row["remover"],
    )
    if row["complete_time"] is not None:
        duration = Duration()
        duration.FromTimedelta(row["complete_time"] - row["create_time"])
        out.duration.CopyFrom(duration)
    return out


def approval_from_row(row: Row) -> pb.Approval:
    return pb.Approval(
        name=f"approvals/{row['id']}",
        tenant=row["tenant"],
        installation=f"installations/{row['installation']}",
        capsule=f"capsules/{row['capsule']}",
        version=row["version"],
        permissions=list(row["permissions"]),
        requester=row["requester"],
        policy_reason=row["policy_reason"],
        state=row["state"],
        approver=row["approver"],
        comment=row["comment"],
        create_time=to_timestamp(row["create_time"]),
        expire_time=to_timestamp(row["expire_time"]),
        decide_time=to_timestamp(row["decide_time"]),
    )


def is_terminal(state: int) -> bool:
    return state not in RUNNING_STATES


def progress_from_row(row: Row) -> capsule_pb2.InstallProgress:
    """What a stream attached to an install reports, from the installation's row."""
    progress = capsule_pb2.InstallProgress(
        installation=f"installations/{row['id']}",
        phase=row["phase"],
        percent=row["percent"],
        files_done=row["files_done"],
        files_total=row["files_total"],
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        message=row["message"],
        approval=f"approvals/{row['approval']}"
        if row["approval"] and row["state"] == AWAITING
        else "",
    )
    if is_terminal(row["state"]):
        failed = row["state"] in (FAILED, REJECTED)
        progress.phase = PHASE_FAILED if failed else PHASE_DONE
        progress.result.CopyFrom(installation_from_row(row))
        if failed:
            error = error_status(row)
            if error is not None:
                progress.error.CopyFrom(error)
        else:
            progress.percent = 100.0
    return progress


# -- semantic version order ----------------------------------------------------------------


def semver_sort_key(key: SemverKey) -> str:
    """A string whose byte order (COLLATE "C") is SemVer 2.0 precedence, from
    `manifest.parse_semver`'s key: numbers compare as numbers (zero-padded), a release sorts
    after its pre-releases, and pre-release identifiers compare numerically when numeric, below
    alphanumeric ones, a shorter list lower. Each identifier ends with `!`, lower than any
    identifier character."""
    major, minor, patch, pre = key
    text = f"{major:020d}.{minor:020d}.{patch:020d}."
    if pre == (1,):
        return text + "~"  # a release: above "-", the pre-release marker
    parts = [f"1{value:020d}!" if kind == 0 else f"2{value}!" for kind, value in pre[1:]]
    return text + "-" + "".join(parts)


# -- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewVersion:
    capsule: str
    version: str
    sort_key: str
    tenant: str
    digest: str
    size_bytes: int
    entry_count: int
    unpacked_bytes: int
    manifest: dict[str, Any]
    signature_format: int
    signature: str
    publisher_key: str | None
    key_fingerprint: str
    verify_result: int
    uploader: str


@dataclass(frozen=True)
class NewInstallation:
    id: str
    tenant: str
    capsule: str
    version: str
    digest: str
    requester: str
    requester_owner: str
    replica: str
    request_id: str


@dataclass(frozen=True)
class NewApproval:
    permissions: list[str]
    policy_reason: str
    ttl: timedelta


@dataclass(frozen=True)
class Progress:
    phase: int
    percent: float
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


# place(current INSTALLED row or None) -> does the filesystem part of an activation
Place = Callable[[Row | None], Awaitable[None]]

_INSTALLATION = "SELECT * FROM capsule_installations"
_ORDERS: dict[int, str] = {
    capsule_pb2.CAPSULE_ORDER_UNSPECIFIED: "installs",
    capsule_pb2.CAPSULE_ORDER_INSTALL_COUNT: "installs",
    capsule_pb2.CAPSULE_ORDER_UPDATE_TIME: "updated",
    capsule_pb2.CAPSULE_ORDER_NAME: "name",
}


def order_of(value: int) -> str:
    return _ORDERS[value]


async def _lock_capsule(conn: asyncpg.Connection, tenant: str, capsule: str) -> None:
    """Takes the (tenant, capsule) advisory lock until the transaction ends."""
    key = f"capsule-install:{tenant}/{capsule}"
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)


class CapsuleStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def prune_requests(self, older_than: timedelta = timedelta(days=7)) -> None:
        await self.pool.execute(
            "DELETE FROM capsule_requests WHERE create_time < now() - $1::interval", older_than
        )

    async def request_resource(self, tenant: str, request_id: str) -> tuple[str, str] | None:
        """(method, resource) a request id was first used for, if it was."""
        if not request_id:
            return None
        row = await self.pool.fetchrow(
            "SELECT method, resource FROM capsule_requests WHERE tenant = $1 AND request_id = $2",
            tenant,
            request_id,
        )
        return (row["method"], row["resource"]) if row else None

    async def enterprise_mode(self, tenant: str) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT enterprise_mode FROM auth_tenants WHERE id = $1", tenant
            )
        )

    # -- capsules and versions -------------------------------------------------------------

    async def get_capsule(self, name: str) -> Row | None:
        return await self.pool.fetchrow("SELECT * FROM capsule_capsules WHERE name = $1", name)

    async def list_capsules(
        self,
        *,
        tenant: str,
        query: str,
        publisher: str,
        verified_only: bool,
        permission: str,
        order: str,
        after: Mapping[str, Any] | None,
        limit: int,
    ) -> tuple[list[Row], Row | None]:
        """Capsules visible to `tenant` (public ones and its own), filtered and ordered; the
        second value is the last row when there are more."""
        where = ["(visibility = $1 OR tenant = $2)"]
        args: list[Any] = [PUBLIC, tenant]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern += "%"
            p = arg(pattern)
            where.append(f"(name ILIKE {p} OR description ILIKE {p})")
        if publisher:
            where.append(f"tenant = {arg(publisher)}")
        if verified_only:
            where.append("verified")
        if permission:
            where.append(f"{arg(permission)} = ANY(permissions)")
        if order == "installs":
            sort = "install_count DESC, name"
            if after is not None:
                c, n = arg(int(after["c"])), arg(str(after["n"]))
                where.append(f"(install_count < {c} OR (install_count = {c} AND name > {n}))")
        elif order == "updated":
            sort = "update_time DESC, name"
            if after is not None:
                t, n = arg(datetime.fromisoformat(str(after["t"]))), arg(str(after["n"]))
                where.append(f"(update_time < {t} OR (update_time = {t} AND name > {n}))")
        else:
            sort = "name"
            if after is not None:
                where.append(f"name > {arg(str(after['n']))}")
        rows = await self.pool.fetch(
            f"SELECT * FROM capsule_capsules WHERE {' AND '.join(where)} "
            f"ORDER BY {sort} LIMIT {arg(limit + 1)}",
            *args,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return list(rows), (rows[-1] if more else None)

    async def get_version(self, capsule: str, version: str) -> Row | None:
        return await self.pool.fetchrow(
            "SELECT * FROM capsule_versions WHERE capsule = $1 AND version = $2", capsule, version
        )

    async def list_versions(
        self, capsule: str, before_key: str | None, limit: int
    ) -> tuple[list[Row], str | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM capsule_versions
               WHERE capsule = $1 AND ($2::text IS NULL OR sort_key < $2::text COLLATE "C")
               ORDER BY sort_key DESC LIMIT $3""",
            capsule,
            before_key,
            limit + 1,
        )
        return paging.split_page(rows, limit, "sort_key")

    @staticmethod
    async def _refresh(conn: asyncpg.Connection, capsule: str, *, touch: bool) -> None:
        """Copies what the latest (highest not yanked) version says onto the capsule."""
        await conn.execute(
            """WITH v AS (
                   SELECT version, manifest, verify_result FROM capsule_versions
                   WHERE capsule = $1 AND NOT yanked ORDER BY sort_key DESC LIMIT 1)
               UPDATE capsule_capsules SET
                   latest_version = coalesce((SELECT version FROM v), ''),
                   description = coalesce((SELECT manifest->>'description' FROM v), description),
                   permissions = coalesce(
                       (SELECT ARRAY(SELECT jsonb_array_elements_text(manifest->'permissions'))
                        FROM v), permissions),
                   homepage = coalesce((SELECT manifest->>'homepage' FROM v), homepage),
                   license = coalesce((SELECT manifest->>'license' FROM v), license),
                   verified = coalesce((SELECT verify_result = $2 FROM v), false),
                   update_time = CASE WHEN $3 THEN now() ELSE update_time END
               WHERE name = $1""",
            capsule,
            VERIFIED,
            touch,
        )

    async def publish(
        self, new: NewVersion, visibility: int, request_id: str
    ) -> tuple[Row, bool, bool]:
        """Stores a version. Returns (version row, created, capsule created). The same
        version with the same digest (or a repeated request id) returns the existing one."""
        async with self.pool.acquire() as conn, conn.transaction():
            capsule = await conn.fetchrow(
                """INSERT INTO capsule_capsules (name, tenant, visibility) VALUES ($1, $2, $3)
                   ON CONFLICT (name) DO NOTHING RETURNING *""",
                new.capsule,
                new.tenant,
                visibility or PRIVATE,
            )
            capsule_created = capsule is not None
            if capsule is None:
                capsule = await conn.fetchrow(
                    "SELECT * FROM capsule_capsules WHERE name = $1 FOR UPDATE", new.capsule
                )
            if capsule["tenant"] != new.tenant:
                raise owned_elsewhere(new.capsule)
            name = version_name(new.capsule, new.version)
            existing = await conn.fetchrow(
                "SELECT * FROM capsule_versions WHERE capsule = $1 AND version = $2",
                new.capsule,
                new.version,
            )
            if existing is not None:
                if existing["digest"] != new.digest:
                    raise version_exists(new.capsule, new.version, existing["digest"])
                await db.claim_request(
                    conn, REQUESTS_TABLE, new.tenant, request_id, "PublishCapsule", name
                )
                return existing, False, False
            if not await db.claim_request(
                conn, REQUESTS_TABLE, new.tenant, request_id, "PublishCapsule", name
            ):
                raise AssertionError("unreachable: a repeat names an existing version")
            row = await conn.fetchrow(
                """INSERT INTO capsule_versions
                       (capsule, version, sort_key, tenant, digest, size_bytes, entry_count,
                        unpacked_bytes, manifest, signature_format, signature, publisher_key,
                        key_fingerprint, verify_result, uploader)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12::uuid,
                           $13, $14, $15)
                   RETURNING *""",
                new.capsule,
                new.version,
                new.sort_key,
                new.tenant,
                new.digest,
                new.size_bytes,
                new.entry_count,
                new.unpacked_bytes,
                json.dumps(new.manifest),
                new.signature_format,
                new.signature,
                new.publisher_key,
                new.key_fingerprint,
                new.verify_result,
                new.uploader,
            )
            if visibility and visibility != capsule["visibility"]:
                await conn.execute(
                    "UPDATE capsule_capsules SET visibility = $2 WHERE name = $1",
                    new.capsule,
                    visibility,
                )
            if capsule_created:
                # The ownership tuple the relationship model reads (`tenant:<id> owner
                # capsule:<name>`).
                await conn.execute(
                    """INSERT INTO auth_role_bindings (id, tenant, subject, relation, object,
                                                       creator)
                       VALUES ($1, $2, $3, 'owner', $4, $5) ON CONFLICT DO NOTHING""",
                    uuid.uuid4(),
                    new.tenant,
                    f"tenant:{new.tenant}",
                    f"capsule:{new.capsule}",
                    new.uploader,
                )
            await self._refresh(conn, new.capsule, touch=True)
            return row, True, capsule_created

    async def yank(
        self, tenant: str, capsule: str, version: str, reason: str, request_id: str
    ) -> Row:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM capsule_versions WHERE capsule = $1 AND version = $2 FOR UPDATE",
                capsule,
                version,
            )
            if row is None:
                raise version_not_found(capsule, version)
            if row["tenant"] != tenant:
                raise owned_elsewhere(capsule)
            name = version_name(capsule, version)
            if not await db.claim_request(
                conn, REQUESTS_TABLE, tenant, request_id, "YankCapsuleVersion", name
            ):
                return row
            if row["yanked"]:
                return row  # yanking a yanked version changes nothing
            row = await conn.fetchrow(
                """UPDATE capsule_versions SET yanked = true, yank_reason = $3, yank_time = now()
                   WHERE capsule = $1 AND version = $2 RETURNING *""",
                capsule,
                version,
                reason,
            )
            await self._refresh(conn, capsule, touch=True)
            return row

    async def record_verification(
        self, capsule: str, version: str, result: int, key_id: str | None, fingerprint: str
    ) -> Row:
        """Records the result of a verification (and the key that verified, if any)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE capsule_versions SET verify_result = $3, verify_time = now(),
                       publisher_key = coalesce($4::uuid, publisher_key),
                       key_fingerprint = CASE WHEN $4::uuid IS NULL THEN key_fingerprint
                                              ELSE $5 END
                   WHERE capsule = $1 AND version = $2 RETURNING *""",
                capsule,
                version,
                result,
                key_id,
                fingerprint,
            )
            await self._refresh(conn, capsule, touch=False)
            return row

    # -- publisher keys ----------------------------------------------------------------------

    async def register_key(
        self,
        *,
        tenant: str,
        display_name: str,
        pem: str,
        fingerprint: str,
        key_hint: str,
        creator: str,
        request_id: str,
    ) -> Row:
        async with self.pool.acquire() as conn, conn.transaction():
            if request_id:
                first = await conn.fetchrow(
                    """SELECT * FROM capsule_publisher_keys
                       WHERE tenant = $1 AND request_id = $2""",
                    tenant,
                    request_id,
                )
                if first is not None:
                    return first
            existing = await conn.fetchval(
                "SELECT id FROM capsule_publisher_keys WHERE tenant = $1 AND fingerprint = $2",
                tenant,
                fingerprint,
            )
            if existing is not None:
                raise AlreadyExists(
                    f"tenant {tenant} already registered this key as publisherKeys/{existing} "
                    f"({fingerprint})",
                    reason="PUBLISHER_KEY_EXISTS",
                )
            try:
                return await conn.fetchrow(
                    """INSERT INTO capsule_publisher_keys
                           (id, tenant, display_name, public_key_pem, fingerprint, key_hint,
                            state, creator, request_id)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULLIF($9, ''))
                       RETURNING *""",
                    uuid.uuid4(),
                    tenant,
                    display_name,
                    pem,
                    fingerprint,
                    key_hint,
                    KEY_ACTIVE,
                    creator,
                    request_id,
                )
            except asyncpg.UniqueViolationError as error:  # a concurrent registration
                raise AlreadyExists(
                    f"tenant {tenant} already registered this key ({fingerprint})",
                    reason="PUBLISHER_KEY_EXISTS",
                ) from error

    async def get_key(self, tenant: str, key_id: str) -> Row | None:
        return await self.pool.fetchrow(
            "SELECT * FROM capsule_publisher_keys WHERE id = $1 AND tenant = $2",
            uuid.UUID(key_id),
            tenant,
        )

    async def keys_of(self, tenant: str) -> list[Row]:
        """Every key of a tenant (active and revoked), newest first."""
        return list(
            await self.pool.fetch(
                "SELECT * FROM capsule_publisher_keys WHERE tenant = $1 ORDER BY pos DESC", tenant
            )
        )

    async def list_keys(
        self, tenant: str, state: int, before_pos: int | None, limit: int
    ) -> tuple[list[Row], int | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM capsule_publisher_keys
               WHERE tenant = $1 AND ($2 = 0 OR state = $2)
                 AND ($3::bigint IS NULL OR pos < $3)
               ORDER BY pos DESC LIMIT $4""",
            tenant,
            state,
            before_pos,
            limit + 1,
        )
        return paging.split_page(rows, limit, "pos")

    async def revoke_key(
        self, tenant: str, key_id: str, reason: str, request_id: str
    ) -> tuple[Row, list[str]]:
        """Revokes a key and marks every version it verified KEY_REVOKED. Returns the key and
        the versions that stopped verifying (empty for a repeat or an already revoked key)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT * FROM capsule_publisher_keys WHERE id = $1 AND tenant = $2
                   FOR UPDATE""",
                uuid.UUID(key_id),
                tenant,
            )
            if row is None:  # another tenant's key is as unknown as a key that never was
                raise key_not_found(key_id)
            if not await db.claim_request(
                conn,
                REQUESTS_TABLE,
                tenant,
                request_id,
                "RevokePublisherKey",
                f"publisherKeys/{key_id}",
            ):
                return row, []
            if row["state"] == KEY_REVOKED:
                return row, []
            row = await conn.fetchrow(
                """UPDATE capsule_publisher_keys SET state = $2, revoke_time = now(),
                       revoke_reason = $3
                   WHERE id = $1 RETURNING *""",
                row["id"],
                KEY_REVOKED,
                reason,
            )
            flipped = await conn.fetch(
                """UPDATE capsule_versions SET verify_result = $2, verify_time = now()
                   WHERE publisher_key = $1 RETURNING capsule, version""",
                row["id"],
                pb.VERIFICATION_RESULT_KEY_REVOKED,
            )
            for capsule in sorted({r["capsule"] for r in flipped}):
                await self._refresh(conn, capsule, touch=False)
            return row, [version_name(r["capsule"], r["version"]) for r in flipped]

    # -- installations -------------------------------------------------------------------------

    async def get_installation(self, installation_id: str, tenant: str | None = None) -> Row | None:
        row = await self.pool.fetchrow(f"{_INSTALLATION} WHERE id = $1", uuid.UUID(installation_id))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return row

    async def installation_by_request(self, tenant: str, request_id: str) -> Row | None:
        if not request_id:
            return None
        return await self.pool.fetchrow(
            f"{_INSTALLATION} WHERE tenant = $1 AND request_id = $2", tenant, request_id
        )

    async def current_installation(self, tenant: str, capsule: str) -> Row | None:
        return await self.pool.fetchrow(
            f"{_INSTALLATION} WHERE tenant = $1 AND capsule = $2 AND state = $3",
            tenant,
            capsule,
            INSTALLED,
        )

    async def list_installations(
        self,
        tenant: str,
        *,
        capsule: str,
        state: int,
        requester: str,
        before_pos: int | None,
        limit: int,
    ) -> tuple[list[Row], int | None]:
        rows = await self.pool.fetch(
            f"""{_INSTALLATION}
               WHERE tenant = $1 AND ($2 = '' OR capsule = $2) AND ($3 = 0 OR state = $3)
                 AND ($4 = '' OR requester = $4) AND ($5::bigint IS NULL OR pos < $5)
               ORDER BY pos DESC LIMIT $6""",
            tenant,
            capsule,
            state,
            requester,
            before_pos,
            limit + 1,
        )
        return paging.split_page(rows, limit, "pos")

    async def create_installation(
        self, new: NewInstallation, approval: NewApproval | None
    ) -> tuple[Row, Row | None, bool]:
        """Creates an installation (and its approval when the policy asks for one). Returns
        (installation, approval, created); a repeated request id returns the first one."""
        async with self.pool.acquire() as conn, conn.transaction():
            state, phase, message = PENDING, pb.INSTALL_PHASE_QUEUED, "queued"
            approval_id = uuid.uuid4() if approval else None
            if approval is not None:
                state, phase = AWAITING, PHASE_AWAITING
                message = f"waiting for approval approvals/{approval_id}"
            row = await conn.fetchrow(
                """INSERT INTO capsule_installations
                       (id, tenant, capsule, version, digest, requester, requester_owner, state,
                        approval, phase, message, replica, request_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULLIF($13, ''))
                   ON CONFLICT (tenant, request_id) DO NOTHING
                   RETURNING *""",
                uuid.UUID(new.id),
                new.tenant,
                new.capsule,
                new.version,
                new.digest,
                new.requester,
                new.requester_owner,
                state,
                approval_id,
                phase,
                message,
                new.replica,
                new.request_id,
            )
            if row is None:
                first = await conn.fetchrow(
                    f"{_INSTALLATION} WHERE tenant = $1 AND request_id = $2",
                    new.tenant,
                    new.request_id,
                )
                return first, None, False
            approval_row = None
            if approval is not None:
                approval_row = await conn.fetchrow(
                    """INSERT INTO capsule_approvals
                           (id, tenant, installation, capsule, version, permissions, requester,
                            requester_owner, policy_reason, state, expire_time)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11::interval)
                       RETURNING *""",
                    approval_id,
                    new.tenant,
                    uuid.UUID(new.id),
                    new.capsule,
                    new.version,
                    approval.permissions,
                    new.requester,
                    new.requester_owner,
                    approval.policy_reason,
                    APPROVAL_PENDING,
                    approval.ttl,
                )
            return row, approval_row, True

    async def save_progress(self, installation_id: str, progress: Progress) -> bool:
        """Records progress (and a heartbeat) unless the install already ended."""
        status = await self.pool.execute(
            """UPDATE capsule_installations SET phase = $2, percent = $3, files_done = $4,
                   files_total = $5, bytes_done = $6, bytes_total = $7, message = $8,
                   heartbeat_time = now()
               WHERE id = $1 AND state IN (1, 2)""",
            uuid.UUID(installation_id),
            progress.phase,
            progress.percent,
            progress.files_done,
            progress.files_total,
            progress.bytes_done,
            progress.bytes_total,
            progress.message,
        )
        return bool(status.endswith(" 1"))

    async def heartbeat(self, installation_ids: Sequence[str]) -> None:
        if installation_ids:
            await self.pool.execute(
                """UPDATE capsule_installations SET heartbeat_time = now()
                   WHERE id = ANY($1::uuid[]) AND state IN (1, 2)""",
                [uuid.UUID(i) for i in installation_ids],
            )

    @staticmethod
    async def _fail(
        conn: asyncpg.Connection | asyncpg.Pool,
        where: str,
        args: Sequence[Any],
        state: int,
        failure: Failure,
    ) -> list[Row]:
        n = len(args)
        return list(
            await conn.fetch(
                f"""UPDATE capsule_installations SET state = ${n + 1}, error_code = ${n + 2},
                       error_message = ${n + 3}, error_reason = ${n + 4}, phase = {PHASE_FAILED},
                       message = ${n + 3}, complete_time = now(), heartbeat_time = now()
                   WHERE {where} AND state IN (1, 2)
                   RETURNING *""",
                *args,
                state,
                failure.code,
                failure.message,
                failure.reason,
            )
        )

    async def _reject(
        self, conn: asyncpg.Connection, installation_id: uuid.UUID, message: str, reason: str
    ) -> Row | None:
        """Ends an install that waited for an approval REJECTED (FAILED_PRECONDITION); None if
        it had already ended."""
        failure = Failure(FAILED_PRECONDITION_CODE, message, reason)
        rows = await self._fail(conn, "id = $1", [installation_id], REJECTED, failure)
        return rows[0] if rows else None

    async def fail_installation(self, installation_id: str, failure: Failure) -> Row | None:
        """Ends a running install FAILED; None if it had already ended."""
        rows = await self._fail(self.pool, "id = $1", [uuid.UUID(installation_id)], FAILED, failure)
        return rows[0] if rows else None

    async def interrupted(self, replica: str, failure: Failure) -> list[Row]:
        """At start: this replica's installs that had begun working on disk when it stopped
        end FAILED (those still queued or waiting for an approval are resumed)."""
        return await self._fail(
            self.pool,
            "replica = $1 AND state = $2 AND phase >= $3",
            [replica, PENDING, pb.INSTALL_PHASE_VERIFYING_SIGNATURE],
            FAILED,
            failure,
        )

    async def stale(self, older_than: timedelta, failure: Failure) -> list[Row]:
        """Running installs whose replica stopped reporting (it died for good) end FAILED."""
        return await self._fail(
            self.pool,
            "state = $1 AND heartbeat_time < now() - $2::interval",
            [PENDING, older_than],
            FAILED,
            failure,
        )

    async def resumable(self, replica: str) -> list[Row]:
        """This replica's installs that were queued or waiting for an approval when it
        stopped: nothing of them is on disk yet, so they go on."""
        return list(
            await self.pool.fetch(
                f"""{_INSTALLATION} WHERE replica = $1 AND state IN ($2, $3)
                    AND phase IN ($4, $5) ORDER BY pos""",
                replica,
                PENDING,
                AWAITING,
                pb.INSTALL_PHASE_QUEUED,
                PHASE_AWAITING,
            )
        )

    async def activate(
        self,
        installation_id: str,
        tenant: str,
        capsule: str,
        *,
        path: str,
        file_count: int,
        size_bytes: int,
        place: Place,
    ) -> tuple[Row, Row | None]:
        """Makes a finished extraction the tenant's current installation of the capsule.
        Under the (tenant, capsule) lock: `place(current)` moves the files into place, then
        the previous installation (if any) becomes SUPERSEDED. Returns (installation,
        superseded)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_capsule(conn, tenant, capsule)
            me = await conn.fetchrow(
                "SELECT * FROM capsule_installations WHERE id = $1 FOR UPDATE",
                uuid.UUID(installation_id),
            )
            if me is None or me["state"] != PENDING:
                raise FailedPrecondition(
                    "the install ended while it was being activated", reason="INSTALL_ENDED"
                )
            current = await conn.fetchrow(
                """SELECT * FROM capsule_installations
                   WHERE tenant = $1 AND capsule = $2 AND state = $3 FOR UPDATE""",
                tenant,
                capsule,
                INSTALLED,
            )
            await place(current)
            superseded = None
            if current is not None:
                superseded = await conn.fetchrow(
                    """UPDATE capsule_installations SET state = $2, remove_time = now(),
                           remover = $3
                       WHERE id = $1 RETURNING *""",
                    current["id"],
                    SUPERSEDED,
                    me["requester"],
                )
            row = await conn.fetchrow(
                f"""UPDATE capsule_installations SET state = $2, path = $3, file_count = $4,
                       size_bytes = $5, complete_time = now(), phase = {PHASE_DONE},
                       percent = 100, message = 'installed', heartbeat_time = now()
                   WHERE id = $1 RETURNING *""",
                me["id"],
                INSTALLED,
                path,
                file_count,
                size_bytes,
            )
            await conn.execute(
                "UPDATE capsule_capsules SET install_count = install_count + 1 WHERE name = $1",
                capsule,
            )
            return row, superseded

    async def uninstall(
        self,
        tenant: str,
        capsule: str,
        remover: str,
        request_id: str,
        remove: Callable[[Row], Awaitable[None]],
    ) -> Row:
        """Marks the current installation UNINSTALLED; `remove(row)` deletes its files under
        the (tenant, capsule) lock. A repeated request id returns the installation it
        uninstalled."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_capsule(conn, tenant, capsule)
            first = await self.request_resource(tenant, request_id)
            if first is not None and first[0] == "UninstallCapsule":
                previous = await conn.fetchrow(
                    f"{_INSTALLATION} WHERE id = $1 AND tenant = $2",
                    uuid.UUID(first[1].removeprefix("installations/")),
                    tenant,
                )
                if previous is not None and previous["capsule"] == capsule:
                    return previous
            current = await conn.fetchrow(
                """SELECT * FROM capsule_installations
                   WHERE tenant = $1 AND capsule = $2 AND state = $3 FOR UPDATE""",
                tenant,
                capsule,
                INSTALLED,
            )
            if current is None:
                raise FailedPrecondition(
                    f"capsules/{capsule} is not installed in tenant {tenant}; nothing to uninstall",
                    reason="CAPSULE_NOT_INSTALLED",
                )
            await db.claim_request(
                conn,
                REQUESTS_TABLE,
                tenant,
                request_id,
                "UninstallCapsule",
                f"installations/{current['id']}",
            )
            await remove(current)
            return await conn.fetchrow(
                """UPDATE capsule_installations SET state = $2, remove_time = now(), remover = $3
                   WHERE id = $1 RETURNING *""",
                current["id"],
                UNINSTALLED,
                remover,
            )

    async def reconcile(
        self, tenant: str, capsule: str, version: str, remove: Callable[[], Awaitable[None]]
    ) -> None:
        """Under the (tenant, capsule) lock: `remove()` the directory of `version` unless it
        is the current installation (an install killed between its rename and its commit)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_capsule(conn, tenant, capsule)
            current = await conn.fetchval(
                """SELECT version FROM capsule_installations
                   WHERE tenant = $1 AND capsule = $2 AND state = $3""",
                tenant,
                capsule,
                INSTALLED,
            )
            if current != version:
                await remove()

    # -- approvals -----------------------------------------------------------------------------

    async def get_approval(self, approval_id: str, tenant: str | None = None) -> Row | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM capsule_approvals WHERE id = $1", uuid.UUID(approval_id)
        )
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return row

    async def list_approvals(
        self, tenant: str, *, state: int, capsule: str, before_pos: int | None, limit: int
    ) -> tuple[list[Row], int | None]:
        rows = await self.pool.fetch(
            """SELECT * FROM capsule_approvals
               WHERE tenant = $1 AND ($2 = 0 OR state = $2) AND ($3 = '' OR capsule = $3)
                 AND ($4::bigint IS NULL OR pos < $4)
               ORDER BY pos DESC LIMIT $5""",
            tenant,
            state,
            capsule,
            before_pos,
            limit + 1,
        )
        return paging.split_page(rows, limit, "pos")

    async def decide(
        self,
        tenant: str,
        approval_id: str,
        *,
        approve: bool,
        approver: str,
        comment: str,
        request_id: str,
        check: Callable[[Row | None], None],
    ) -> tuple[Row, Row | None]:
        """Approves or rejects a pending approval. `check(row)` refuses callers who may not
        decide it. Returns (approval, installation); the installation is None for a repeat."""
        method = "ApproveCapsule" if approve else "RejectCapsule"
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM capsule_approvals WHERE id = $1 AND tenant = $2 FOR UPDATE",
                uuid.UUID(approval_id),
                tenant,
            )
            check(row)
            assert row is not None  # check() refuses a missing approval
            name = f"approvals/{approval_id}"
            if not await db.claim_request(conn, REQUESTS_TABLE, tenant, request_id, method, name):
                return row, None
            if row["state"] != APPROVAL_PENDING:
                state = pb.ApprovalState.Name(row["state"]).removeprefix("APPROVAL_STATE_")
                raise FailedPrecondition(
                    f"{name} is {state.lower()}, not pending: it can no longer be decided",
                    reason="APPROVAL_NOT_PENDING",
                )
            if row["expire_time"] <= await conn.fetchval("SELECT now()"):
                raise FailedPrecondition(
                    f"{name} expired at {row['expire_time'].isoformat()}: it can no longer be "
                    "decided; the requester can install again",
                    reason="APPROVAL_EXPIRED",
                )
            row = await conn.fetchrow(
                """UPDATE capsule_approvals SET state = $2, approver = $3, comment = $4,
                       decide_time = now()
                   WHERE id = $1 RETURNING *""",
                row["id"],
                APPROVAL_APPROVED if approve else APPROVAL_REJECTED,
                approver,
                comment,
            )
            if approve:
                installation = await conn.fetchrow(
                    """UPDATE capsule_installations SET state = $2,
                           message = 'approved; continuing', heartbeat_time = now()
                       WHERE id = $1 AND state = $3 RETURNING *""",
                    row["installation"],
                    PENDING,
                    AWAITING,
                )
            else:
                why = f": {comment}" if comment else ""
                installation = await self._reject(
                    conn,
                    row["installation"],
                    f"{name} was rejected by {approver}{why}",
                    "APPROVAL_REJECTED",
                )
            return row, installation

    async def expire_due(self) -> list[tuple[Row, Row | None]]:
        """Pending approvals past their expiry become EXPIRED and their installs REJECTED.
        Returns what it changed (each row is changed by one replica only)."""
        async with self.pool.acquire() as conn, conn.transaction():
            expired = await conn.fetch(
                """UPDATE capsule_approvals SET state = $1, decide_time = now()
                   WHERE state = $2 AND expire_time <= now() RETURNING *""",
                APPROVAL_EXPIRED,
                APPROVAL_PENDING,
            )
            out: list[tuple[Row, Row | None]] = []
            for row in expired:
                installation = await self._reject(
                    conn,
                    row["installation"],
                    f"approvals/{row['id']} expired at {row['expire_time'].isoformat()} "
                    "before an approver decided; ask an approver, then install again",
                    "APPROVAL_EXPIRED",
                )
                out.append((row, installation))
            return out


def owned_elsewhere(capsule: str) -> PermissionDenied:
    return PermissionDenied(
        f"capsule name {capsule!r} belongs to another tenant: only the tenant that first "
        "published it can publish or yank its versions; choose another name",
        reason="CAPSULE_OWNED_BY_ANOTHER_TENANT",
    )


def version_exists(capsule: str, version: str, digest: str) -> AlreadyExists:
    return AlreadyExists(
        f"{version_name(capsule, version)} was already published with other bytes ({digest}); "
        "a published version never changes: publish a new version number",
        reason="CAPSULE_VERSION_EXISTS",
    )


def version_not_found(capsule: str, version: str) -> NotFound:
    return NotFound(
        f"{version_name(capsule, version)} does not exist", reason="CAPSULE_VERSION_NOT_FOUND"
    )


def key_not_found(key_id: str) -> NotFound:
    return NotFound(
        f"publisher key publisherKeys/{key_id} does not exist", reason="PUBLISHER_KEY_NOT_FOUND"
    )
