"""Offline verification of a JSON Lines audit export (`soma audit verify FILE`).

Every line is one AuditEvent in its proto3 JSON form, carrying `sequence`, `previous_hash` and
`hash`. Per tenant, in file order, each event must:

1. come in chain order: its sequence is the previous one's + 1 (else OUT_OF_ORDER when the
   expected sequence is elsewhere in the file, MISSING_EVENT when it is nowhere);
2. continue the chain: `previous_hash` is the previous event's `hash` (PREVIOUS_HASH_MISMATCH);
   the first event of a chain (sequence 1) continues from 64 zeros;
3. hash to its own `hash`, recomputed from the canonical bytes (HASH_MISMATCH: altered).

Checks 2 and 3 (and the gap of 1) are services/common/audit/chain.py's ChainVerifier, the very
code the Audit service chains and verifies with; only OUT_OF_ORDER is ours. An export that
starts after sequence 1 (`--since`, or retention dropped the start) is anchored at its first
event's `previous_hash`: compare that with the server's checkpoint or an earlier export's head
to close the gap (docs/siem.md, "Verifying an export offline").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from services.common.audit import chain
from soma.audit.v1 import resources_pb2

# Offline-only reasons; the others are chain.ChainBreak.reason_name (HASH_MISMATCH,
# PREVIOUS_HASH_MISMATCH, MISSING_EVENT), as VerifyAuditChain names them.
OUT_OF_ORDER = "OUT_OF_ORDER"
MALFORMED = "MALFORMED"


@dataclass(frozen=True)
class Break:
    """The first link that does not verify."""

    reason: str
    line: int
    message: str
    tenant: str = ""
    sequence: int = 0
    event: str = ""
    expected: str = ""
    actual: str = ""


@dataclass
class ChainSummary:
    """One tenant's chain as far as it verified."""

    tenant: str
    first_sequence: int = 0
    last_sequence: int = 0
    events: int = 0
    anchor: str = ""  # the previous_hash the export starts from
    head: str = ""  # the hash of the last verified event

    @property
    def from_start(self) -> bool:
        return self.first_sequence == 1


@dataclass
class Result:
    path: str = ""
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    first_break: Break | None = None

    @property
    def ok(self) -> bool:
        return self.first_break is None and bool(self.chains)

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chains.values())

    def describe(self) -> str:
        lines: list[str] = []
        if self.first_break is not None:
            b = self.first_break
            where = f"tenant {b.tenant!r}, sequence {b.sequence}, " if b.tenant else ""
            lines.append(f"BROKEN: {where}line {b.line}: {b.reason}: {b.message}")
            if b.expected or b.actual:
                lines.append(f"  expected {b.expected or '-'}")
                lines.append(f"  found    {b.actual or '-'}")
        elif not self.chains:
            return "EMPTY: the file holds no audit events (nothing verified)"
        else:
            plural = "chain" if len(self.chains) == 1 else "chains"
            lines.append(f"OK: {self.events} events in {len(self.chains)} {plural} verified")
        for c in self.chains.values():
            if not c.events:
                continue
            anchor = "start of chain" if c.from_start else f"previous_hash {c.anchor}"
            lines.append(
                f"  tenant {c.tenant!r}: {c.events} events verified, sequences "
                f"{c.first_sequence}..{c.last_sequence}, head {c.head} (anchor: {anchor})"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events_verified": self.events,
            "chains": [
                {
                    "tenant": c.tenant,
                    "first_sequence": c.first_sequence,
                    "last_sequence": c.last_sequence,
                    "events_verified": c.events,
                    "anchor_hash": c.anchor,
                    "head_hash": c.head,
                }
                for c in self.chains.values()
            ],
            "first_break": None if self.first_break is None else vars(self.first_break),
        }


@dataclass
class _Line:
    number: int
    event: resources_pb2.AuditEvent


def parse_line(text: str) -> resources_pb2.AuditEvent:
    """One export line -> AuditEvent; ValueError saying what is wrong with it."""
    if text.startswith("CEF:"):
        raise ValueError("a CEF record: verify needs a JSON Lines export (--format jsonl)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "class_uid" in data:
        raise ValueError("an OCSF record: verify needs a JSON Lines export (--format jsonl)")
    event = resources_pb2.AuditEvent()
    try:
        json_format.ParseDict(data, event)
    except json_format.ParseError as exc:
        raise ValueError(f"not an AuditEvent: {exc}") from None
    if not event.hash or not event.sequence:
        raise ValueError("no `sequence`/`hash`: not an export of stored events")
    return event


def verify_lines(lines: Iterable[str], path: str = "") -> Result:
    """Reads a whole export and verifies every tenant's chain; stops at the first break."""
    result = Result(path=path)
    by_tenant: dict[str, list[_Line]] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            event = parse_line(text)
        except ValueError as exc:
            result.first_break = Break(MALFORMED, number, str(exc))
            return result
        by_tenant.setdefault(event.tenant, []).append(_Line(number, event))
    breaks = []
    for tenant, items in by_tenant.items():
        summary, broken = verify_chain(tenant, items)
        result.chains[tenant] = summary
        if broken is not None:
            breaks.append(broken)
    if breaks:
        result.first_break = min(breaks, key=lambda b: b.line)  # the earliest in the file
    return result


def verify_chain(tenant: str, items: list[_Line]) -> tuple[ChainSummary, Break | None]:
    """One tenant's events in file order, through chain.ChainVerifier (the server's checks),
    after our own order check: a line that is merely out of place is not a deletion."""
    summary = ChainSummary(tenant)
    if not items:
        return summary, None
    first = items[0].event
    if first.sequence == 1:
        verifier = chain.ChainVerifier()
    else:  # a mid-chain export: anchored at what it says precedes it
        verifier = chain.ChainVerifier(first.sequence - 1, first.previous_hash)
    summary.first_sequence = first.sequence
    summary.anchor = first.previous_hash
    present = {item.event.sequence for item in items}
    for item in items:
        event = item.event
        want = verifier.last_sequence + 1
        if summary.events and event.sequence != want and (event.sequence < want or want in present):
            return summary, Break(
                OUT_OF_ORDER,
                item.number,
                f"event {event.sequence} follows event {want - 1}: the export was reordered "
                f"or an event repeated (expected event {want} here)",
                tenant,
                event.sequence,
                event.name,
            )
        found = verifier.check(event)
        if found is not None:
            return summary, Break(
                found.reason_name,
                item.number,
                found.message,
                tenant,
                found.sequence,
                found.event,
                found.expected_hash,
                found.actual_hash,
            )
        summary.last_sequence = event.sequence
        summary.head = event.hash
        summary.events += 1
    return summary, None
