"""`soma audit list|tail|export`: parsing, filters, rendering, and the calls (on a fake stub)."""

from __future__ import annotations

import argparse
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.api import httpbody_pb2

from services.client import audit_cli
from services.client.cli import build_parser
from soma.audit.v1 import audit_pb2, resources_pb2

NOW = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["audit", *argv])


def event(seq: int = 7, **fields: Any) -> resources_pb2.AuditEvent:
    ev = resources_pb2.AuditEvent(
        name=f"auditEvents/00000000-0000-4000-8000-{seq:012d}",
        tenant="acme",
        actor=resources_pb2.AuditActor(subject="user:alice", key_id="k1"),
        client_address="10.0.0.5:51000",
        method="/soma.keys.v1.KeysService/CreateApiKey",
        resource="keys/k2",
        decision=resources_pb2.AUDIT_DECISION_ALLOW,
        decision_reason="role admin",
        status_code=0,
        sequence=seq,
    )
    ev.event_time.FromDatetime(NOW + timedelta(milliseconds=250))
    for key, value in fields.items():
        if key == "actor":
            ev.actor.Clear()
            ev.actor.MergeFrom(value)
        else:
            setattr(ev, key, value)
    return ev


# -- parsing ----------------------------------------------------------------------------------


def test_list_defaults() -> None:
    args = parse("list")
    assert (args.group, args.verb) == ("audit", "list")
    assert (args.order, args.limit, args.tenant, args.decision) == ("newest", 50, "", None)
    assert args.since is None and args.until is None


def test_list_options_build_the_filter() -> None:
    args = parse(
        "list", "--tenant", "acme", "--actor", "user:bob", "--method",
        "/soma.keys.v1.KeysService/", "--resource", "keys/*", "--decision", "deny",
        "--since", "1h", "--until", "2025-01-31T12:00:00Z", "--order", "oldest", "--limit", "5",
    )  # fmt: skip
    flt = audit_cli.build_filter(args)
    assert (flt.tenant, flt.actor, flt.method, flt.resource) == (
        "acme", "user:bob", "/soma.keys.v1.KeysService/", "keys/*"
    )  # fmt: skip
    assert flt.decision == resources_pb2.AUDIT_DECISION_DENY
    assert flt.end_time.ToDatetime(tzinfo=UTC) == NOW
    ago = datetime.now(UTC) - flt.start_time.ToDatetime(tzinfo=UTC)
    assert timedelta(minutes=59) < ago < timedelta(minutes=61)
    assert audit_cli.ORDERS[args.order] == audit_pb2.AUDIT_EVENT_ORDER_OLDEST_FIRST
    assert args.limit == 5


def test_empty_filter_leaves_times_unset() -> None:
    flt = audit_cli.build_filter(parse("list"))
    assert not flt.HasField("start_time") and not flt.HasField("end_time")
    assert flt.decision == resources_pb2.AUDIT_DECISION_UNSPECIFIED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("7d", NOW - timedelta(days=7)),
        ("2025-01-30T08:00:00Z", datetime(2025, 1, 30, 8, tzinfo=UTC)),
        ("2025-01-30T09:00:00+01:00", datetime(2025, 1, 30, 8, tzinfo=UTC)),
        ("2025-01-30", datetime(2025, 1, 30, tzinfo=UTC)),
    ],
)
def test_parse_moment(text: str, expected: datetime) -> None:
    assert audit_cli.parse_moment(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "2025-13-01"])
def test_bad_moments_say_what_works(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        audit_cli.parse_moment(text, now=NOW)


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--decision", "maybe"],
        ["list", "--order", "random"],
        ["list", "--limit", "-1"],
        ["list", "--since", "soon"],
        ["tail", "--after-sequence", "x"],
        ["export", "--format", "xml"],
        ["verify"],
        [],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_tail_export_verify_parse() -> None:
    tail = parse("tail", "--after-sequence", "41", "--tenant", "acme", "--limit", "3")
    assert (tail.after_sequence, tail.tenant, tail.limit, tail.live_only) == (41, "acme", 3, False)
    export = parse("export", "--format", "ocsf-auth", "--since", "24h")
    assert audit_cli.FORMATS[export.format] == audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION
    assert parse("export").format == "jsonl"
    assert parse("verify", "audit.jsonl").file == "audit.jsonl"
    # Connection options work after the verb, as for `soma keys`.
    assert parse("list", "--json", "--target", "h:1").json is True


def test_every_export_format_maps_to_the_contract() -> None:
    assert set(audit_cli.FORMATS) == {"jsonl", "cef", "ocsf-api", "ocsf-auth"}
    assert len(set(audit_cli.FORMATS.values())) == 4


# -- rendering --------------------------------------------------------------------------------


def test_event_table() -> None:
    deny = event(8, decision=resources_pb2.AUDIT_DECISION_DENY, status_code=7, resource="")
    text = audit_cli.event_table([event(), deny])
    lines = text.splitlines()
    assert lines[0].split() == list(audit_cli.EVENT_COLUMNS)
    assert lines[1].split() == [
        "2025-01-31T12:00:00.250Z", "7", "acme", "user:alice", "KeysService/CreateApiKey",
        "keys/k2", "allow", "OK",
    ]  # fmt: skip
    assert lines[2].split()[-3:] == ["-", "deny", "PERMISSION_DENIED"]
    assert audit_cli.event_table([]) == "No audit events."


def test_actor_and_method_forms() -> None:
    anonymous = event(actor=resources_pb2.AuditActor())
    assert audit_cli.actor_text(anonymous) == "anonymous@10.0.0.5:51000"
    assert audit_cli.actor_text(event(actor=resources_pb2.AuditActor(key_id="k9"))) == "key:k9"
    assert audit_cli.short_method("/soma.audit.v1.AuditService/ListAuditEvents") == (
        "AuditService/ListAuditEvents"
    )
    assert audit_cli.short_method("") == "-"
    assert audit_cli.status_name(16) == "UNAUTHENTICATED" and audit_cli.status_name(99) == "99"


def test_event_line_is_one_line_with_the_reason() -> None:
    line = audit_cli.event_line(event())
    assert "\n" not in line
    assert line.startswith("2025-01-31T12:00:00.250Z #7 acme user:alice ")
    assert line.endswith("allow OK role admin")


# -- commands on a fake stub --------------------------------------------------------------------


class FakeStream:
    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[Any]:
        for item in self.items:
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeAudit:
    def __init__(self, events: list[resources_pb2.AuditEvent]) -> None:
        self.events = events
        self.requests: list[Any] = []
        self.stream: FakeStream | None = None

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest
    ) -> audit_pb2.ListAuditEventsResponse:
        self.requests.append(request)
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(self.events) else ""
        return audit_pb2.ListAuditEventsResponse(
            audit_events=self.events[start:end], next_page_token=token
        )

    def TailAuditEvents(self, request: audit_pb2.TailAuditEventsRequest) -> FakeStream:
        self.requests.append(request)
        self.stream = FakeStream(self.events)
        return self.stream

    def ExportAuditEvents(self, request: audit_pb2.ExportAuditEventsRequest) -> FakeStream:
        self.requests.append(request)
        chunks = [b'{"a":1}\n{"a":2}\n', b'{"a":3}\n']
        return FakeStream([httpbody_pb2.HttpBody(data=c) for c in chunks])


class FakeClient:
    def __init__(self, events: list[resources_pb2.AuditEvent]) -> None:
        self.audit = FakeAudit(events)


def commands(
    events: list[resources_pb2.AuditEvent], as_json: bool = False
) -> tuple[audit_cli.AuditCommands, FakeAudit, io.StringIO, io.StringIO]:
    client = FakeClient(events)
    out, err = io.StringIO(), io.StringIO()
    cmds = audit_cli.AuditCommands(client, as_json, out, err)  # type: ignore[arg-type]
    return cmds, client.audit, out, err


async def test_list_follows_pages_up_to_the_limit() -> None:
    many = [event(i) for i in range(1, 1201)]
    cmds, audit, out, _ = commands(many)
    await cmds.dispatch(parse("list", "--limit", "700", "--decision", "allow"))
    assert [r.page_size for r in audit.requests] == [500, 200]
    assert audit.requests[0].filter.decision == resources_pb2.AUDIT_DECISION_ALLOW
    assert audit.requests[0].order == audit_pb2.AUDIT_EVENT_ORDER_NEWEST_FIRST
    assert len(out.getvalue().splitlines()) == 701  # header + 700 rows


async def test_list_limit_zero_reads_everything_as_json() -> None:
    import json

    cmds, audit, out, _ = commands([event(i) for i in range(1, 4)], as_json=True)
    await cmds.dispatch(parse("list", "--limit", "0", "--order", "oldest"))
    data = json.loads(out.getvalue())
    assert [e["sequence"] for e in data["audit_events"]] == ["1", "2", "3"]
    assert audit.requests[0].order == audit_pb2.AUDIT_EVENT_ORDER_OLDEST_FIRST


async def test_tail_prints_one_line_per_event_and_stops_at_limit() -> None:
    cmds, audit, out, _ = commands([event(i) for i in range(1, 6)])
    await cmds.dispatch(parse("tail", "--after-sequence", "0", "--limit", "2"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and " #1 " in lines[0] and " #2 " in lines[1]
    assert audit.stream is not None and audit.stream.cancelled


async def test_tail_json_lines_and_request() -> None:
    cmds, audit, out, _ = commands([event(3)], as_json=True)
    await cmds.dispatch(parse("tail", "--after-sequence", "2", "--live-only", "--tenant", "t"))
    [request] = audit.requests
    assert (request.after_sequence, request.live_only, request.filter.tenant) == (2, True, "t")
    assert out.getvalue().count("\n") == 1 and '"sequence":"3"' in out.getvalue()


async def test_export_streams_bytes_and_reports_progress_on_stderr() -> None:
    cmds, audit, out, err = commands([])
    await cmds.dispatch(parse("export", "--format", "cef", "--since", "1d", "--tenant", "acme"))
    [request] = audit.requests
    assert request.format == audit_pb2.AUDIT_EXPORT_FORMAT_CEF
    assert request.filter.tenant == "acme" and request.filter.HasField("start_time")
    assert out.getvalue() == '{"a":1}\n{"a":2}\n{"a":3}\n'
    assert err.getvalue().strip() == "exported 3 records (24 bytes, cef)"


async def test_export_writes_raw_bytes_when_stdout_has_a_buffer() -> None:
    cmds, _, _, err = commands([])
    raw = io.BytesIO()
    cmds.out = io.TextIOWrapper(raw, encoding="utf-8")
    await cmds.dispatch(parse("export"))
    assert raw.getvalue() == b'{"a":1}\n{"a":2}\n{"a":3}\n'
    assert "exported 3 records" in err.getvalue()
