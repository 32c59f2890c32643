"""Output of the `soma` CLI: plain aligned tables, key/value blocks, and JSON.

Nothing here ever receives a secret except `secret_block`, which prints it once with the
"store it now" line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from soma.keys.v1 import resources_pb2

STORE_IT_NOW = "Store this secret now: it is shown only once and cannot be retrieved again."

KEY_COLUMNS = ("KEY ID", "NAME", "STATE", "ROLES", "SCOPES", "OWNER", "EXPIRES", "LAST USED")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (list(headers), *rows)
    ]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs)


def timestamp(ts: timestamp_pb2.Timestamp, present: bool = True) -> str:
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    moment = datetime.fromtimestamp(ts.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def state_name(value: int) -> str:
    name: str = resources_pb2.ApiKeyState.Name(value) if value in _STATES else str(value)
    return name.removeprefix("API_KEY_STATE_").lower()


_STATES = set(resources_pb2.ApiKeyState.values())


def _join(values: Sequence[str]) -> str:
    return ",".join(values) if values else "-"


def key_row(key: resources_pb2.ApiKey) -> list[str]:
    return [
        key.key_id or key.name.removeprefix("keys/"),
        key.display_name or "-",
        state_name(key.state),
        _join(key.roles),
        _join(key.scopes),
        key.owner or "-",
        timestamp(key.expire_time, key.HasField("expire_time")),
        timestamp(key.last_used_time, key.HasField("last_used_time")),
    ]


def key_table(keys: Sequence[resources_pb2.ApiKey]) -> str:
    if not keys:
        return "No API keys."
    return table(KEY_COLUMNS, [key_row(k) for k in keys])


def key_details(key: resources_pb2.ApiKey) -> str:
    def ts(name: str) -> str:
        return timestamp(getattr(key, name), key.HasField(name))

    budget = f"{key.remaining_calls} of {key.usage_budget} left" if key.usage_budget else "-"
    rate = f"{key.rate_limit_per_minute}/min" if key.rate_limit_per_minute else "-"
    return fields(
        [
            ("name", key.name),
            ("key id", key.key_id),
            ("prefix", key.prefix or "-"),
            ("display name", key.display_name or "-"),
            ("tenant", key.tenant),
            ("state", state_name(key.state)),
            ("owner", key.owner or "-"),
            ("roles", _join(key.roles)),
            ("scopes", _join(key.scopes)),
            ("budget", budget),
            ("rate limit", rate),
            ("expires", ts("expire_time")),
            ("last used", ts("last_used_time")),
            ("created", ts("create_time")),
            ("updated", ts("update_time")),
            ("rotated", ts("rotate_time")),
            ("previous secret until", ts("previous_secret_expire_time")),
            ("revoked", ts("revoke_time")),
        ]
    )


def secret_block(secret: str) -> str:
    return f"\nsecret  {secret}\n{STORE_IT_NOW}"


def to_dict(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)
