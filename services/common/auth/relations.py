"""Relationship tuples (OpenFGA style) in Postgres table auth_role_bindings.

A tuple is `<subject> <relation> <object>`: `user:alice member tenant:acme` binds a role,
`tenant:acme owner capsule:hello` records ownership, `user:root admin platform:soma` makes a
platform admin. `MODEL` mirrors policy/model.fga (whose `fga model test` suite,
policy/model.fga.yaml, the unit tests also run against this store): an admin holds every role of
its tenant, an approver is a member, and capsule permissions follow the owning tenant's roles.

Reads are cached per process (a short TTL as a backstop); `invalidate()` drops the cache and is
what the revocation listener calls on `bindings.changed` (and `keys.updated`). `write` and
`delete` invalidate this process's cache only: the caller publishes `bindings.changed`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.common.errors import AlreadyExists, InvalidArgument

log = logging.getLogger(__name__)

PLATFORM = "platform:soma"
TENANT_ROLES = frozenset({"admin", "member", "approver", "auditor"})
_ENTITY = re.compile(r"^[a-z][a-z0-9_]*:[^\s#]{1,200}$")
_RELATION = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_MAX_DEPTH = 8


@dataclass(frozen=True)
class Rule:
    """One relation of model.fga: `define r: [types] or implied_by... or (rel from parent)...`."""

    types: tuple[str, ...] = ()  # subject types a tuple may bind directly
    implied_by: tuple[str, ...] = ()  # relations on the same object that imply this one
    from_parent: tuple[tuple[str, str], ...] = ()  # (tupleset relation, relation on the parent)


_PEOPLE = ("user", "key")
MODEL: dict[str, dict[str, Rule]] = {
    "platform": {"admin": Rule(_PEOPLE)},
    "tenant": {
        "admin": Rule(_PEOPLE),
        "approver": Rule(_PEOPLE, ("admin",)),
        "member": Rule(_PEOPLE, ("approver",)),
        "auditor": Rule(_PEOPLE, ("admin",)),
    },
    "capsule": {
        "owner": Rule(("tenant",)),
        "can_read": Rule(from_parent=(("owner", "member"), ("owner", "auditor"))),
        "can_install": Rule(from_parent=(("owner", "member"),)),
        "can_approve": Rule(from_parent=(("owner", "approver"),)),
        "can_publish": Rule(from_parent=(("owner", "admin"),)),
    },
}


@dataclass(frozen=True)
class RelationTuple:
    id: str
    tenant: str
    subject: str
    relation: str
    object: str
    create_time: datetime


def type_of(entity: str) -> str:
    return entity.partition(":")[0]


def validate(subject: str, relation: str, object_: str) -> None:
    """Refuses malformed tuples, and tuples the model does not allow to be written."""
    for field, value in (("subject", subject), ("object", object_)):
        if not _ENTITY.match(value):
            raise InvalidArgument(
                f"{field} must look like `<type>:<id>`, got {value!r}", field=field
            )
    if not _RELATION.match(relation):
        raise InvalidArgument(f"relation must be lowercase letters, digits and _: {relation!r}",
                              field="relation")  # fmt: skip
    rules = MODEL.get(type_of(object_))
    if rules is None:
        return  # a type the model does not know: stored and checked as plain tuples
    rule = rules.get(relation)
    if rule is None or not rule.types:
        writable = sorted(r for r, rule in rules.items() if rule.types)
        raise InvalidArgument(
            f"relation {relation!r} cannot be written on {type_of(object_)} objects; "
            f"use one of {', '.join(writable)}",
            field="relation",
        )
    if type_of(subject) not in rule.types:
        raise InvalidArgument(
            f"a {type_of(object_)} {relation} must be a {' or '.join(rule.types)}, "
            f"not {type_of(subject)}",
            field="subject",
        )


class _TtlCache:
    """A small dictionary cache: entries expire after `ttl`, and it empties itself when full."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._data: dict[Hashable, tuple[float, Any]] = {}
        self._ttl, self._max, self._clock = ttl, max_entries, clock

    def get(self, key: Hashable) -> Any | None:
        entry = self._data.get(key)
        if entry is None or entry[0] < self._clock():
            return None
        return entry[1]

    def put(self, key: Hashable, value: Any) -> None:
        if len(self._data) >= self._max:
            self._data.clear()
        self._data[key] = (self._clock() + self._ttl, value)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RelationStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._cache = _TtlCache(ttl, max_entries, clock)
        self.queries = 0  # database round trips, for tests and metrics

    def invalidate(self) -> None:
        """Drops every cached answer (on `bindings.changed`, `keys.updated`, NATS reconnect)."""
        self._cache.clear()

    async def check(self, subject: str, relation: str, object_: str) -> bool:
        """Whether the model derives `subject relation object_` from the stored tuples."""
        key = ("check", subject, relation, object_)
        cached = self._cache.get(key)
        if cached is None:
            cached = await self._check(subject, relation, object_, 0)
            self._cache.put(key, cached)
        return bool(cached)

    async def roles_of(self, subject: str, tenant: str) -> frozenset[str]:
        """The roles bound to `subject` in `tenant` (as bound, not expanded), plus
        `platform_admin` for a platform admin: what an OIDC user's Principal carries."""
        roles = (await self._relations(subject, f"tenant:{tenant}")) & TENANT_ROLES
        if "admin" in await self._relations(subject, PLATFORM):
            roles |= {"platform_admin"}
        return frozenset(roles)

    async def write(self, tenant: str, subject: str, relation: str, object_: str) -> RelationTuple:
        validate(subject, relation, object_)
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO auth_role_bindings (id, tenant, subject, relation, object) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id, create_time",
                uuid.uuid4(),
                tenant,
                subject,
                relation,
                object_,
            )
        except asyncpg.UniqueViolationError as error:
            raise AlreadyExists(
                f"the tuple `{subject} {relation} {object_}` already exists",
                reason="ROLE_BINDING_EXISTS",
            ) from error
        finally:
            self.invalidate()
        return RelationTuple(str(row["id"]), tenant, subject, relation, object_, row["create_time"])

    async def delete(self, subject: str, relation: str, object_: str) -> bool:
        """Deletes a tuple; False if there was none."""
        status = await self._pool.execute(
            "DELETE FROM auth_role_bindings WHERE subject = $1 AND relation = $2 AND object = $3",
            subject,
            relation,
            object_,
        )
        self.invalidate()
        return bool(status.endswith(" 1"))

    async def _check(self, subject: str, relation: str, object_: str, depth: int) -> bool:
        if depth > _MAX_DEPTH:
            log.warning("relation check %s %s %s nested too deep", subject, relation, object_)
            return False
        rule = MODEL.get(type_of(object_), {}).get(relation)
        if rule is None or rule.types:
            if relation in await self._relations(subject, object_):
                return True
        if rule is None:
            return False
        for implying in rule.implied_by:
            if await self._check(subject, implying, object_, depth + 1):
                return True
        for tupleset, parent_relation in rule.from_parent:
            for parent in await self._subjects(tupleset, object_):
                if await self._check(subject, parent_relation, parent, depth + 1):
                    return True
        return False

    async def _relations(self, subject: str, object_: str) -> frozenset[str]:
        """Relations stored directly between subject and object (one indexed query, cached)."""
        key = ("relations", subject, object_)
        cached = self._cache.get(key)
        if cached is None:
            self.queries += 1
            rows = await self._pool.fetch(
                "SELECT relation FROM auth_role_bindings WHERE subject = $1 AND object = $2",
                subject,
                object_,
            )
            cached = frozenset(r["relation"] for r in rows)
            self._cache.put(key, cached)
        return frozenset(cached)

    async def _subjects(self, relation: str, object_: str) -> frozenset[str]:
        """Subjects holding `relation` on `object_` directly, e.g. the owner of a capsule."""
        key = ("subjects", relation, object_)
        cached = self._cache.get(key)
        if cached is None:
            self.queries += 1
            rows = await self._pool.fetch(
                "SELECT subject FROM auth_role_bindings WHERE object = $1 AND relation = $2",
                object_,
                relation,
            )
            cached = frozenset(r["subject"] for r in rows)
            self._cache.put(key, cached)
        return frozenset(cached)
