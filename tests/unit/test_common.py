"""Pure logic of services/common: config, paging, names, error mapping."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2

from services.common import paging
from services.common.config import ConfigError, load_config
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.common.names import check_request_id, parse_name


def test_config_defaults_and_secrets_hidden() -> None:
    config = load_config(
        "gateway",
        {
            "DATABASE_URL": "postgresql://u:hunter2@h/db",
            "VAULT_ADDR": "http://v",
            "VAULT_TOKEN": "s.secret",
        },
    )
    assert config.server.port == 50051
    assert config.partitions == 4
    assert config.nats.servers == ("nats://127.0.0.1:4222",)
    assert "hunter2" not in repr(config)
    assert "s.secret" not in repr(config)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SOMA_PORT": "http"}, "SOMA_PORT"),
        ({"SOMA_PARTITIONS": "0"}, "at least 1"),
        ({"SOMA_LOG_LEVEL": "LOUD"}, "SOMA_LOG_LEVEL"),
        ({"SOMA_LOG_FORMAT": "xml"}, "SOMA_LOG_FORMAT"),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config("gateway", env)


def test_page_size_rules() -> None:
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size(10_000) == paging.MAX_PAGE_SIZE
    assert paging.page_size(7) == 7
    with pytest.raises(InvalidArgument, match="negative"):
        paging.page_size(-1)


def test_page_token_round_trip_and_tamper() -> None:
    query = {"method": "ListSessions", "state": 0}
    token = paging.encode_token({"pos": 42}, query)
    assert paging.decode_token(token, query) == {"pos": 42}
    assert paging.decode_token("", query) is None
    with pytest.raises(InvalidArgument, match="different query"):
        paging.decode_token(token, {"method": "ListSessions", "state": 1})
    with pytest.raises(InvalidArgument, match="not a token"):
        paging.decode_token("not-a-token!!", query)
    with pytest.raises(InvalidArgument):
        paging.decode_token(token[:-3], query)


def test_names() -> None:
    sid = "4828f05a-0bb7-427e-9837-eb224aa48596"
    assert parse_name(f"sessions/{sid}", "sessions", "name") == sid
    for bad in ("", "sessions/", "sessions/NOPE", f"keys/{sid}", f"sessions/{sid}/x"):
        with pytest.raises(InvalidArgument):
            parse_name(bad, "sessions", "name")
    assert check_request_id("") == ""
    assert check_request_id(sid.upper()) == sid
    with pytest.raises(InvalidArgument, match="UUID"):
        check_request_id("retry-1")


def test_error_status_details() -> None:
    status = InvalidArgument("bad", field="message.content", reason="MESSAGE_TOO_LARGE").to_status()
    assert status.code == 3
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("MESSAGE_TOO_LARGE", "soma.dev")
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "message.content"
    assert NotFound("x").to_status().code == 5
    retry = ResourceExhausted("slow down", retry_after_seconds=1.5).to_status()
    info2 = error_details_pb2.RetryInfo()
    assert retry.details[1].Unpack(info2) and info2.retry_delay.seconds == 1
