"""`soma` CLI: argument parsing, environment fallbacks, KEY forms, durations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.client.cli import UsageError, build_parser, client_config, key_name
from services.client.durations import format_duration, parse_duration
from services.common import apikeys


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("24h", 86400),
        ("90m", 5400),
        ("45s", 45),
        ("1h30m", 5400),
        ("2w", 14 * 86400),
        ("0s", 0),
        (" 12H ", 12 * 3600),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "1.5h", "-1h", "1y", "1h 30m", "h1"])
def test_bad_durations_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 30d"):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    assert format_duration(timedelta(seconds=90061)) == "1d1h1m1s"
    assert format_duration(timedelta(0)) == "0s"
    assert parse_duration(format_duration(timedelta(days=3, minutes=5))) == timedelta(
        days=3, minutes=5
    )


def test_keys_create_collects_repeated_options() -> None:
    args = build_parser().parse_args(
        [
            "keys",
            "create",
            "--name",
            "ci",
            "--role",
            "member",
            "--role",
            "auditor",
            "--scope",
            "gateway:read",
            "--expires-in",
            "30d",
            "--budget",
            "100",
            "--rate-limit",
            "60",
        ]
    )
    assert (args.group, args.verb) == ("keys", "create")
    assert args.name == "ci"
    assert args.role == ["member", "auditor"]
    assert args.scope == ["gateway:read"]
    assert args.expires_in == timedelta(days=30)
    assert (args.budget, args.rate_limit) == (100, 60)


def test_defaults_of_create() -> None:
    args = build_parser().parse_args(["keys", "create"])
    assert args.role == [] and args.scope == []
    assert args.expires_in is None and args.budget == 0 and args.rate_limit == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "h:1", "--json", "keys", "list"],
        ["keys", "--target", "h:1", "--json", "list"],
        ["keys", "list", "--target", "h:1", "--json"],
    ],
)
def test_connection_options_go_anywhere(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.target == "h:1" and args.json is True


def test_every_verb_parses() -> None:
    p = build_parser()
    assert p.parse_args(["keys", "get", "abc"]).key == "abc"
    revoke = p.parse_args(["keys", "revoke", "abc", "--reason", "leaked"])
    assert (revoke.key, revoke.reason) == ("abc", "leaked")
    rotate = p.parse_args(["keys", "rotate", "abc", "--grace", "1h"])
    assert rotate.grace == timedelta(hours=1)
    assert p.parse_args(["keys", "rotate", "abc"]).grace is None
    issue = p.parse_args(["token", "issue", "--ttl", "5m", "--scope", "gateway:read"])
    assert (issue.ttl, issue.scope) == (timedelta(minutes=5), ["gateway:read"])
    assert p.parse_args(["keys", "list", "--state", "revoked"]).state == "revoked"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["keys"],
        ["keys", "create", "--expires-in", "soon"],
        ["keys", "create", "--budget", "-1"],
        ["keys", "list", "--state", "sleeping"],
        ["keys", "get"],
        ["token"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(argv)
    assert raised.value.code == 2


def test_config_from_flags_then_environment_then_defaults() -> None:
    env = {"SOMA_TARGET": "env:1", "SOMA_API_KEY": "soma_dev_fromenv", "SOMA_TOKEN": ""}
    args = build_parser().parse_args(["keys", "list"])
    config = client_config(args, env)
    assert (config.target, config.api_key, config.token) == ("env:1", "soma_dev_fromenv", None)
    assert config.timeout == 10.0
    args = build_parser().parse_args(
        ["keys", "list", "--target", "flag:2", "--api-key", "k", "--timeout", "3"]
    )
    config = client_config(args, env)
    assert (config.target, config.api_key, config.timeout) == ("flag:2", "k", 3.0)
    assert client_config(build_parser().parse_args(["keys", "list"]), {}).target == (
        "127.0.0.1:8080"
    )


def test_config_repr_hides_credentials() -> None:
    config = client_config(
        build_parser().parse_args(["keys", "list"]),
        {"SOMA_API_KEY": "soma_dev_supersecret", "SOMA_TOKEN": "eyJtoken"},
    )
    assert "supersecret" not in repr(config) and "eyJtoken" not in repr(config)
    assert config.auth_metadata() == [("authorization", "Bearer eyJtoken")]  # token wins


def test_key_forms() -> None:
    generated = apikeys.generate("dev")
    assert key_name(generated.key_id) == f"keys/{generated.key_id}"
    assert key_name(f"keys/{generated.key_id}") == f"keys/{generated.key_id}"
    assert key_name(generated.secret) == f"keys/{generated.key_id}"  # reduced to its id


def test_a_mistyped_full_key_is_refused_without_echoing_it() -> None:
    secret = apikeys.generate("dev").secret
    typo = secret[:-1] + ("a" if secret[-1] != "a" else "b")
    with pytest.raises(UsageError) as raised:
        key_name(typo)
    assert typo not in str(raised.value) and "checksum" in str(raised.value)
    with pytest.raises(UsageError):
        key_name("  ")
