"""Resource names (AIP-122): parse `collection/{id}` names with errors a person can act on."""

from __future__ import annotations

import re
import uuid

from services.common.errors import InvalidArgument

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_id() -> str:
    return str(uuid.uuid4())


def parse_name(name: str, collection: str, field: str) -> str:
    """Returns the id in `<collection>/<id>`; ids are lowercase UUIDs."""
    if not name:
        raise InvalidArgument(f"{field} is required, e.g. {collection}/<id>", field=field)
    prefix = collection + "/"
    resource_id = name[len(prefix) :] if name.startswith(prefix) else ""
    if not _UUID.match(resource_id):
        raise InvalidArgument(
            f"{field} {name[:100]!r} is not a valid name; expected {collection}/<uuid>",
            field=field,
        )
    return resource_id


def check_request_id(request_id: str) -> str:
    """AIP-155: request ids are UUIDs; empty means "not idempotent"."""
    if request_id and not _UUID.match(request_id.lower()):
        raise InvalidArgument(
            f"request_id {request_id[:64]!r} must be a UUID (e.g. {uuid.uuid4()})",
            field="request_id",
        )
    return request_id.lower()
