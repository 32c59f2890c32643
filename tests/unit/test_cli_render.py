"""`soma` CLI output: aligned tables, key details, the once-only secret block, JSON."""

from __future__ import annotations

import json

from google.protobuf import timestamp_pb2

from services.client import render
from soma.keys.v1 import keys_pb2, resources_pb2


def _key(**kw: object) -> resources_pb2.ApiKey:
    base: dict[str, object] = {
        "name": "keys/abcdefghijklmnop",
        "key_id": "abcdefghijklmnop",
        "tenant": "default",
        "display_name": "ci",
        "roles": ["member"],
        "scopes": ["gateway:read", "keys:read"],
        "state": resources_pb2.API_KEY_STATE_ACTIVE,
        "owner": "user:alice",
    }
    base.update(kw)
    return resources_pb2.ApiKey(**base)  # type: ignore[arg-type]


def test_table_pads_columns_and_strips_trailing_blanks() -> None:
    out = render.table(("A", "LONGER"), [["x", "1"], ["wide cell", ""]])
    assert out.splitlines() == ["A          LONGER", "x          1", "wide cell"]


def test_key_table_has_one_row_per_key_aligned() -> None:
    keys = [_key(), _key(key_id="zzzzzzzzzzzzzzzz", display_name="", roles=[], scopes=[])]
    lines = render.key_table(keys).splitlines()
    assert lines[0].split() == [
        "KEY",
        "ID",
        "NAME",
        "STATE",
        "ROLES",
        "SCOPES",
        "OWNER",
        "EXPIRES",
        "LAST",
        "USED",
    ]
    assert lines[1].split()[:5] == [
        "abcdefghijklmnop",
        "ci",
        "active",
        "member",
        "gateway:read,keys:read",
    ]
    assert lines[2].split()[:5] == ["zzzzzzzzzzzzzzzz", "-", "active", "-", "-"]
    # columns line up: every row's STATE starts where the header's does
    col = lines[0].index("STATE")
    assert all(line[col:].startswith("active") for line in lines[1:])


def test_empty_list_says_so() -> None:
    assert render.key_table([]) == "No API keys."


def test_states_and_timestamps() -> None:
    assert render.state_name(resources_pb2.API_KEY_STATE_REVOKED) == "revoked"
    assert render.state_name(99) == "99"
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    assert render.timestamp(ts) == "2023-11-14 22:13:20Z"
    assert render.timestamp(timestamp_pb2.Timestamp()) == "-"
    assert render.timestamp(ts, present=False) == "-"


def test_details_show_limits_and_times() -> None:
    key = _key(usage_budget=100, remaining_calls=40, rate_limit_per_minute=60)
    key.expire_time.FromSeconds(1_700_000_000)
    text = render.key_details(key)
    assert "40 of 100 left" in text and "60/min" in text
    assert "expires                2023-11-14 22:13:20Z" in text
    assert "revoked                -" in text


def test_secret_block_says_store_it_now() -> None:
    block = render.secret_block("soma_dev_x")
    assert "soma_dev_x" in block and "shown only once" in block


def test_json_uses_proto_field_names() -> None:
    resp = keys_pb2.CreateApiKeyResponse(api_key=_key(), secret="s")
    data = json.loads(render.dump_json(render.to_dict(resp)))
    assert data["secret"] == "s"
    assert data["api_key"]["key_id"] == "abcdefghijklmnop"
    assert data["api_key"]["state"] == "API_KEY_STATE_ACTIVE"
