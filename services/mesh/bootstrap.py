"""First credentials of a mesh, made directly in PostgreSQL and OpenBao (no Keys service call).

`soma-mesh up` on a database with no API key yet creates tenant `default` and an admin key
(roles admin + platform_admin, scopes *, owner `user:admin`) whose secret is printed once in the
ready banner and never stored; `soma-mesh admin create-key` makes another at any time. Only the
HMAC of the key (pepper from OpenBao, services.common.vault) reaches the database, exactly as
the Keys service stores its keys.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from services.common import apikeys, vault
from services.common.auth.migrations import AUTH_MIGRATIONS
from services.common.auth.principal import ROLES
from services.common.config import VaultConfig
from services.common.db import migrate
from services.mesh import openbao
from services.mesh.errors import MeshError
from services.mesh.status import load_running
from soma.keys.v1 import resources_pb2

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
ADMIN_ROLES = ("admin", "platform_admin")
ADMIN_OWNER = "user:admin"
PLATFORM_OBJECT = "platform:soma"
TENANT_ID = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
_LOCK = 0x50_4D_42  # advisory lock: one key creation at a time (next to db.py's migration lock)


@dataclass(frozen=True)
class Connection:
    """Where the mesh keeps its data: the database and OpenBao (root token, local dev)."""

    database_url: str = field(repr=False)  # pgserver's socket URI; may carry a password
    vault: VaultConfig


@dataclass(frozen=True)
class KeySpec:
    tenant: str = DEFAULT_TENANT
    roles: tuple[str, ...] = ADMIN_ROLES
    scopes: tuple[str, ...] = ("*",)
    owner: str = ADMIN_OWNER
    display_name: str = "admin"
    env: str = "dev"  # SOMA_ENV

    def validate(self) -> None:
        if not TENANT_ID.match(self.tenant):
            raise MeshError(
                f"tenant {self.tenant!r}: use 3 to 63 lowercase letters, digits and '-', "
                "starting with a letter"
            )
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown or not self.roles:
            raise MeshError(f"roles must be among {', '.join(ROLES)} (got {', '.join(unknown)})")
        if self.env not in apikeys.ENVS:
            raise MeshError(f"SOMA_ENV={self.env!r}: use {', '.join(apikeys.ENVS)}")


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    tenant: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    owner: str
    display_name: str
    created_tenant: bool
    secret: str = field(repr=False)  # shown once, never stored

    @property
    def name(self) -> str:
        return f"keys/{self.key_id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "owner": self.owner,
            "display_name": self.display_name,
            "created_tenant": self.created_tenant,
            "secret": self.secret,
        }


async def create_key(
    connection: Connection, spec: KeySpec, *, only_if_none: bool = False
) -> CreatedKey | None:
    """Creates the tenant if missing and a key in it. With `only_if_none`, does nothing (None)
    when the database already holds any API key: the bootstrap of `soma-mesh up`."""
    spec.validate()
    pepper = await vault.load_pepper_async(connection.vault)
    conn = await asyncpg.connect(connection.database_url)
    try:
        await migrate(conn, "auth", AUTH_MIGRATIONS)  # normally applied by the services already
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            if only_if_none and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM auth_api_keys)"):
                return None
            created_tenant = await _ensure_tenant(conn, spec)
            key = apikeys.generate(spec.env)
            await conn.execute(
                """INSERT INTO auth_api_keys (id, tenant, owner, display_name, scopes, roles,
                       secret_hash, state)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                key.key_id,
                spec.tenant,
                spec.owner,
                spec.display_name,
                list(spec.scopes),
                list(spec.roles),
                apikeys.hash_secret(pepper, key.secret),
                resources_pb2.API_KEY_STATE_ACTIVE,
            )
    finally:
        await conn.close()
    logger.info(
        "created API key keys/%s (tenant %s, roles %s)",
        key.key_id,
        spec.tenant,
        ",".join(spec.roles),
    )
    return CreatedKey(
        key_id=key.key_id,
        tenant=spec.tenant,
        roles=spec.roles,
        scopes=spec.scopes,
        owner=spec.owner,
        display_name=spec.display_name,
        created_tenant=created_tenant,
        secret=key.secret,
    )


async def _ensure_tenant(conn: asyncpg.Connection, spec: KeySpec) -> bool:
    """The tenant row. When the key is an admin, a new tenant also gets the key's owner as its
    first admin binding (and platform admin binding), as CreateTenant does."""
    created = await conn.fetchval(
        """INSERT INTO auth_tenants (id, display_name) VALUES ($1, $1)
           ON CONFLICT (id) DO NOTHING RETURNING true""",
        spec.tenant,
    )
    if not created:
        return False
    objects = [f"tenant:{spec.tenant}"] if "admin" in spec.roles else []
    if "platform_admin" in spec.roles:
        objects.append(PLATFORM_OBJECT)
    for obj in objects:
        await conn.execute(
            """INSERT INTO auth_role_bindings (id, tenant, subject, relation, object)
               VALUES ($1, $2, $3, 'admin', $4) ON CONFLICT DO NOTHING""",
            uuid.uuid4(),
            spec.tenant,
            spec.owner,
            obj,
        )
    logger.info("created tenant %s", spec.tenant)
    return True


async def bootstrap(connection: Connection, env: str = "dev") -> CreatedKey | None:
    """`soma-mesh up`: tenant `default` + an admin key, unless any API key exists already."""
    return await create_key(
        connection, KeySpec(display_name="bootstrap admin", env=env), only_if_none=True
    )


def connection_for(data_dir: Path, environ: Mapping[str, str]) -> Connection:
    """The running mesh's database and OpenBao, from state.json and openbao/init.json.

    Parts the mesh took from the environment (DATABASE_URL, VAULT_ADDR) are read from it again:
    state.json keeps no passwords nor tokens.
    """
    state = load_running(data_dir)  # NotRunningError: nothing to connect to
    external = {p.get("name") for p in state.get("parts", []) if p.get("external")}
    database_url = environ.get("DATABASE_URL", "") if "postgres" in external else ""
    database_url = database_url or str(state.get("database_url") or "")
    if not database_url or "***" in database_url:
        raise MeshError("the mesh uses an external PostgreSQL: set DATABASE_URL")
    if "openbao" in external:
        addr, token = environ.get("VAULT_ADDR", ""), environ.get("VAULT_TOKEN", "")
        if not (addr and token):
            raise MeshError("the mesh uses an external OpenBao: set VAULT_ADDR and VAULT_TOKEN")
    else:
        addr = str(state.get("vault_addr") or "")
        token = openbao.root_token(data_dir / "openbao" / "init.json")
    return Connection(database_url, VaultConfig(addr, token))


@dataclass(frozen=True)
class SigningKey:
    version: int
    kid: str
    created: bool  # the key did not exist: this made version 1


def rotate_signing_key(config: VaultConfig, key_name: str = vault.JWT_KEY_NAME) -> SigningKey:
    """Adds a version to the JWT signing key (transit): new tokens get the new kid, tokens of the
    previous versions verify until they expire. Creates the key if the Keys service has not."""
    from hvac import exceptions as hvac_errors

    client = vault.client(config)
    transit = client.secrets.transit

    def attempt() -> SigningKey:
        try:
            transit.read_key(name=key_name, mount_point=vault.TRANSIT_MOUNT)
            created = False
        except hvac_errors.InvalidPath:
            transit.create_key(
                name=key_name, key_type="ecdsa-p256", mount_point=vault.TRANSIT_MOUNT
            )
            created = True
        if not created:
            transit.rotate_key(name=key_name, mount_point=vault.TRANSIT_MOUNT)
        data = transit.read_key(name=key_name, mount_point=vault.TRANSIT_MOUNT)["data"]
        version = int(data["latest_version"])
        return SigningKey(version, vault.kid_for(version, key_name), created)

    return vault.with_retry(attempt, f"rotate transit key {key_name}")
