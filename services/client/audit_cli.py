"""`soma audit ...`: the auditor's commands (query, follow, export, verify offline).

    soma audit list [--tenant T] [--actor A] [--method M] [--resource R]
                    [--decision allow|deny] [--since 1h] [--until T]
                    [--order newest|oldest] [--limit N]
    soma audit tail [--tenant T] [--after-sequence N] [--live-only] [--limit N]
    soma audit export --format jsonl|cef|ocsf-api|ocsf-auth [--tenant T] [--since] [--until]
    soma audit verify FILE

`--since`/`--until` take a duration back from now (`1h`, `7d`) or an RFC 3339 time
(`2025-01-31T12:00:00Z`, `2025-01-31`). `verify` runs offline on a JSON Lines export (see
services/client/audit_verify.py) and needs no mesh; the others call the Audit service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2

from services.client import render
from services.client.argtypes import non_negative
from services.client.commands import CommandGroup
from services.client.durations import parse_duration
from soma.audit.v1 import audit_pb2, resources_pb2

DECISIONS = {
    "allow": resources_pb2.AUDIT_DECISION_ALLOW,
    "deny": resources_pb2.AUDIT_DECISION_DENY,
}
ORDERS = {
    "newest": audit_pb2.AUDIT_EVENT_ORDER_NEWEST_FIRST,
    "oldest": audit_pb2.AUDIT_EVENT_ORDER_OLDEST_FIRST,
}
FORMATS = {
    "jsonl": audit_pb2.AUDIT_EXPORT_FORMAT_JSON_LINES,
    "cef": audit_pb2.AUDIT_EXPORT_FORMAT_CEF,
    "ocsf-api": audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_API_ACTIVITY,
    "ocsf-auth": audit_pb2.AUDIT_EXPORT_FORMAT_OCSF_AUTHENTICATION,
}
MAX_PAGE = 500  # the server's cap on page_size
EVENT_COLUMNS = ("TIME", "SEQ", "TENANT", "ACTOR", "METHOD", "RESOURCE", "DECISION", "STATUS")


# -- parsing ----------------------------------------------------------------------------------


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """`1h` (that long ago) or an RFC 3339 time / date (UTC when it has no offset)."""
    value = text.strip()
    try:
        return (now or datetime.now(UTC)) - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use a duration back from now (1h, 7d) "
            "or an RFC 3339 time (2025-01-31T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _moment(text: str) -> datetime:
    try:
        return parse_moment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _filter_options(parser: argparse.ArgumentParser, *, times: bool, selectors: bool) -> None:
    parser.add_argument(
        "--tenant", default="", help="another tenant's events (platform admins only)"
    )
    if selectors:
        parser.add_argument("--actor", default="", help="subject, key id or token kid")
        parser.add_argument(
            "--method", default="", help="full method, or a service prefix ending in /"
        )
        parser.add_argument("--resource", default="", help="resource name; a trailing * matches")
        parser.add_argument("--decision", choices=sorted(DECISIONS), help="allow or deny")
    if times:
        parser.add_argument("--since", type=_moment, help="from this time (1h, 7d or RFC 3339)")
        parser.add_argument("--until", type=_moment, help="before this time (1h, 7d or RFC 3339)")


def add_parser(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Adds `audit` and its verbs to the `soma` parser."""
    audit = groups.add_parser("audit", help="the audit trail of your tenant", parents=[common])
    verbs = audit.add_subparsers(dest="verb", required=True)

    lst = verbs.add_parser("list", help="list events as a table", parents=[common])
    _filter_options(lst, times=True, selectors=True)
    lst.add_argument("--order", choices=sorted(ORDERS), default="newest")
    lst.add_argument("--limit", type=non_negative, default=50, help="at most N events (0 = all)")

    tail = verbs.add_parser("tail", help="follow events live, one line each", parents=[common])
    _filter_options(tail, times=False, selectors=True)
    tail.add_argument(
        "--after-sequence",
        type=non_negative,
        default=0,
        help="replay events after this sequence first",
    )
    tail.add_argument("--live-only", action="store_true", help="no replay: only new events")
    tail.add_argument(
        "--limit", type=non_negative, default=0, help="stop after N events (0 = never)"
    )

    export = verbs.add_parser(
        "export", help="stream an export to stdout (progress on stderr)", parents=[common]
    )
    export.add_argument("--format", choices=list(FORMATS), default="jsonl")
    _filter_options(export, times=True, selectors=False)

    verify = verbs.add_parser(
        "verify", help="verify a JSON Lines export offline (no mesh needed)", parents=[common]
    )
    verify.add_argument("file", metavar="FILE", help="the export; - reads stdin")


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def build_filter(args: argparse.Namespace) -> audit_pb2.AuditEventFilter:
    """The request filter from whichever filter options the verb has."""
    flt = audit_pb2.AuditEventFilter(
        tenant=args.tenant,
        actor=getattr(args, "actor", ""),
        method=getattr(args, "method", ""),
        resource=getattr(args, "resource", ""),
    )
    if getattr(args, "decision", None):
        flt.decision = DECISIONS[args.decision]
    if getattr(args, "since", None) is not None:
        flt.start_time.CopyFrom(_timestamp(args.since))
    if getattr(args, "until", None) is not None:
        flt.end_time.CopyFrom(_timestamp(args.until))
    return flt


# -- rendering --------------------------------------------------------------------------------


def decision_name(value: int) -> str:
    return {1: "allow", 2: "deny"}.get(value, "-")


def status_name(value: int) -> str:
    if value in code_pb2.Code.values():
        return str(code_pb2.Code.Name(value))
    return str(value)


def actor_text(event: resources_pb2.AuditEvent) -> str:
    actor = event.actor
    if actor.subject:
        return actor.subject
    if actor.key_id:
        return f"key:{actor.key_id}"
    return f"anonymous@{event.client_address}" if event.client_address else "anonymous"


def short_method(method: str) -> str:
    """`/soma.keys.v1.KeysService/CreateApiKey` -> `KeysService/CreateApiKey`."""
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}" if service else method or "-"


def event_time(event: resources_pb2.AuditEvent) -> str:
    if not event.HasField("event_time"):
        return "-"
    moment = event.event_time.ToDatetime(tzinfo=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def event_row(event: resources_pb2.AuditEvent) -> list[str]:
    return [
        event_time(event),
        str(event.sequence) if event.sequence else "-",
        event.tenant or "-",
        actor_text(event),
        short_method(event.method),
        event.resource or "-",
        decision_name(event.decision),
        status_name(event.status_code),
    ]


def event_table(events: list[resources_pb2.AuditEvent]) -> str:
    if not events:
        return "No audit events."
    return render.table(EVENT_COLUMNS, [event_row(e) for e in events])


def event_line(event: resources_pb2.AuditEvent) -> str:
    """One line per event for `tail`: the table's columns, then the reason."""
    line = " ".join(f"#{c}" if i == 1 else c for i, c in enumerate(event_row(event)))
    return f"{line} {event.decision_reason}" if event.decision_reason else line


def compact_json(event: resources_pb2.AuditEvent) -> str:
    return json.dumps(render.to_dict(event), separators=(",", ":"), ensure_ascii=False)


# -- commands ---------------------------------------------------------------------------------


class AuditCommands(CommandGroup):
    """`soma audit list|tail|export` against the Audit service."""

    async def dispatch(self, args: argparse.Namespace) -> None:
        await getattr(self, f"audit_{args.verb}")(args)

    async def audit_list(self, args: argparse.Namespace) -> None:
        events: list[resources_pb2.AuditEvent] = []
        token = ""
        while True:
            want = MAX_PAGE if args.limit == 0 else min(MAX_PAGE, args.limit - len(events))
            page = await self.client.audit.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(
                    page_size=want, page_token=token, filter=build_filter(args),
                    order=ORDERS[args.order],
                )
            )  # fmt: skip
            events.extend(page.audit_events)
            token = page.next_page_token
            if not token or (args.limit and len(events) >= args.limit):
                break
        if args.limit:
            events = events[: args.limit]
        if self.json:
            print(render.dump_json({"audit_events": [render.to_dict(e) for e in events]}),
                  file=self.out)  # fmt: skip
        else:
            print(event_table(events), file=self.out)

    async def audit_tail(self, args: argparse.Namespace) -> None:
        request = audit_pb2.TailAuditEventsRequest(
            filter=build_filter(args), after_sequence=args.after_sequence, live_only=args.live_only
        )
        call = self.client.audit.TailAuditEvents(request)
        seen = 0
        try:
            async for event in call:
                print(compact_json(event) if self.json else event_line(event), file=self.out)
                self.out.flush()  # one line per event, as it arrives, even into a pipe
                seen += 1
                if args.limit and seen >= args.limit:
                    break
        finally:
            call.cancel()

    async def audit_export(self, args: argparse.Namespace) -> None:
        request = audit_pb2.ExportAuditEventsRequest(
            filter=build_filter(args), format=FORMATS[args.format]
        )
        progress = Progress(self.err)
        buffer = getattr(self.out, "buffer", None)  # bytes as sent, when stdout has a buffer
        async for chunk in self.client.audit.ExportAuditEvents(request):
            if buffer is not None:
                self.out.flush()
                buffer.write(chunk.data)
            else:
                self.out.write(chunk.data.decode("utf-8"))
            progress.add(chunk.data)
        if buffer is not None:
            buffer.flush()
        self.out.flush()
        progress.done(args.format)


class Progress:
    """Records and bytes exported, on stderr: a live line on a terminal, always a summary."""

    INTERVAL = 0.5

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.records = 0
        self.bytes = 0
        self.live = err.isatty()
        self._last = 0.0

    def add(self, data: bytes) -> None:
        self.records += data.count(b"\n")  # chunks hold whole records, one per line
        self.bytes += len(data)
        now = time.monotonic()
        if self.live and now - self._last >= self.INTERVAL:
            self._last = now
            print(f"\rexported {self.records} records ({self.bytes} bytes)", end="",
                  file=self.err, flush=True)  # fmt: skip

    def done(self, fmt: str) -> None:
        lead = "\r" if self.live else ""
        print(f"{lead}exported {self.records} records ({self.bytes} bytes, {fmt})", file=self.err)


def verify_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`soma audit verify FILE`: 0 when every chain in the file verifies, else 1."""
    from services.client import audit_verify  # only this verb needs the chain code

    try:
        if args.file == "-":
            result = audit_verify.verify_lines(sys.stdin, "<stdin>")
        else:
            with Path(args.file).open(encoding="utf-8") as handle:
                result = audit_verify.verify_lines(handle, args.file)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror or exc}", file=err)
        return 1
    if getattr(args, "json", False):
        print(render.dump_json(result.to_dict()), file=out)
    else:
        print(result.describe(), file=out)
    return 0 if result.ok else 1
