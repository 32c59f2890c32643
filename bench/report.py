"""ghz-shaped JSON reports built from an h2load run.

The shape follows ghz's runner/reporter.go (`Report`, `Options`, `LatencyDistribution`, `Bucket`):
durations are integer nanoseconds (Go's time.Duration), `date` is RFC 3339, latency statistics
count successful requests only, and percentiles use ghz's nearest-rank rule, so a report here
reads like one from `ghz -O json`. `details` is left empty: one entry per request would make
every file megabytes long.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.h2load import H2loadSummary, LoadShape, LogEntry, missing_bodies

GHZ_PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
NS_PER_US = 1_000


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """ghz's nearest-rank percentile of an ascending list (the value at rank ceil(p% of n))."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    rank = p / 100.0 * len(sorted_values)
    index = int(rank)
    if rank == index:  # the rank is a whole number: that element, 0-based
        index -= 1
    return sorted_values[max(index, 0)]


def latency_distribution(sorted_ns: Sequence[int]) -> list[dict[str, int]]:
    if not sorted_ns:
        return []
    return [{"percentage": p, "latency": int(percentile(sorted_ns, p))} for p in GHZ_PERCENTILES]


def histogram(sorted_ns: Sequence[int], buckets: int = 10) -> list[dict[str, float]]:
    """ghz's histogram: `buckets`+1 marks from fastest to slowest (in seconds), counts per mark."""
    if not sorted_ns:
        return []
    fastest, slowest = sorted_ns[0] / 1e9, sorted_ns[-1] / 1e9
    step = (slowest - fastest) / buckets
    marks = [fastest + step * i for i in range(buckets)] + [slowest]
    counts = [0] * len(marks)
    bucket = 0
    for value in sorted_ns:
        seconds = value / 1e9
        while seconds > marks[bucket] and bucket < len(marks) - 1:
            bucket += 1
        counts[bucket] += 1
    total = len(sorted_ns)
    return [
        {"mark": mark, "count": count, "frequency": count / total}
        for mark, count in zip(marks, counts, strict=True)
    ]


def rfc3339(moment: datetime) -> str:
    """Go's time.RFC3339 (seconds precision, `Z` for UTC)."""
    text = moment.isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


@dataclass(frozen=True)
class CaseResult:
    """One measured case: what was asked, what h2load printed, what it logged."""

    name: str
    call: str  # gRPC method, `package.Service.Method`
    host: str  # host:port the load went to
    shape: LoadShape
    summary: H2loadSummary
    entries: Sequence[LogEntry]
    expected_body_bytes: int = 0  # bytes of one good response body (0: do not check)
    data: Mapping[str, Any] | None = None  # the request, as JSON (ghz's `data`)
    tags: Mapping[str, str] = field(default_factory=dict)
    date: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def ok_latencies_ns(self) -> list[int]:
        return sorted(e.duration_us * NS_PER_US for e in self.entries if e.ok)

    @property
    def short_bodies(self) -> int:
        return missing_bodies(self.summary, self.expected_body_bytes)

    @property
    def errors(self) -> int:
        """Requests that did not succeed: non-2xx, failed streams, and 2xx with no body."""
        failed = max(self.summary.failed, self.summary.done - self.summary.succeeded)
        return failed + self.summary.timeout + self.short_bodies

    @property
    def rps(self) -> float:
        return len(self.entries) / self.summary.elapsed_s if self.summary.elapsed_s else 0.0

    def percentile_ms(self, p: float) -> float | None:
        lat = self.ok_latencies_ns
        return percentile(lat, p) / 1e6 if lat else None


def status_distribution(result: CaseResult) -> dict[str, int]:
    """Statuses keyed like ghz where we can tell: "OK" for a 2xx with a full body.

    Anything else keeps its HTTP status (`HTTP 503`), `HTTP 200 without body` for what is likely
    a gRPC error in a 200, and `failed` for streams that ended with no status.
    """
    counts = Counter(e.status for e in result.entries)
    dist: dict[str, int] = {}
    ok = sum(n for status, n in counts.items() if 200 <= status < 300)
    short = min(result.short_bodies, ok)
    if ok - short:
        dist["OK"] = ok - short
    if short:
        dist["HTTP 200 without body"] = short
    for status, n in sorted(counts.items()):
        if 200 <= status < 300:
            continue
        dist["failed" if status < 0 else f"HTTP {status}"] = n
    return dist


def error_distribution(result: CaseResult) -> dict[str, int]:
    s = result.summary
    dist: dict[str, int] = {}
    non_2xx = s.status_3xx + s.status_4xx + s.status_5xx
    if non_2xx:
        dist["non-2xx HTTP status"] = non_2xx
    if s.errored:
        dist["h2load: stream errored (reset or connection lost)"] = s.errored
    if s.timeout:
        dist["h2load: timeout"] = s.timeout
    if result.short_bodies:
        dist["2xx without the expected response body (likely a grpc-status error)"] = (
            result.short_bodies
        )
    return dist


def ghz_report(result: CaseResult) -> dict[str, Any]:
    """The ghz `Report` of one case, ready for json.dump."""
    shape = result.shape
    entries = result.entries
    lat = result.ok_latencies_ns
    total_ns = int(result.summary.elapsed_s * 1e9)
    options: dict[str, Any] = {
        "call": result.call,
        "host": result.host,
        "insecure": True,
        "load-schedule": "const",
        "load-start": 0,
        "load-end": 0,
        "load-step": 0,
        "load-step-duration": 0,
        "load-max-duration": 0,
        "concurrency": shape.in_flight,
        "concurrency-schedule": "const",
        "concurrency-start": 0,
        "concurrency-end": 0,
        "concurrency-step": 0,
        "concurrency-step-duration": 0,
        "concurrency-max-duration": 0,
        "connections": shape.clients,
        "binary": False,
        "CPUs": os.cpu_count() or 1,
        "name": result.name,
    }
    if shape.duration is not None:
        options["duration"] = int(shape.duration * 1e9)
    else:
        options["total"] = shape.requests
    if result.data is not None:
        options["data"] = dict(result.data)
    report: dict[str, Any] = {
        "name": result.name,
        "endReason": "normal",
        "date": rfc3339(result.date),
        "options": options,
        "count": len(entries),
        "total": total_ns,
        "average": (
            int(sum(e.duration_us for e in entries) * NS_PER_US / len(entries)) if entries else 0
        ),
        "fastest": lat[0] if lat else 0,
        "slowest": lat[-1] if lat else 0,
        "rps": result.rps,
        "errorDistribution": error_distribution(result),
        "statusCodeDistribution": status_distribution(result),
        "latencyDistribution": latency_distribution(lat),
        "histogram": histogram(lat),
        "details": [],
        "tags": dict(result.tags),
    }
    return report


def summary_row(result: CaseResult) -> dict[str, Any]:
    """The numbers summary.json and the stdout table show for a case."""

    def ms(p: float) -> float | None:
        value = result.percentile_ms(p)
        return round(value, 3) if value is not None else None

    s = result.summary
    return {
        "rps": round(result.rps, 1),
        "h2load_rps": s.rps,
        "count": len(result.entries),
        "p50_ms": ms(50),
        "p90_ms": ms(90),
        "p99_ms": ms(99),
        "errors": result.errors,
        "status_codes": {
            "2xx": s.status_2xx,
            "3xx": s.status_3xx,
            "4xx": s.status_4xx,
            "5xx": s.status_5xx,
        },
        "failed": s.failed,
        "errored": s.errored,
        "timeout": s.timeout,
        "short_bodies": result.short_bodies,
        "host": result.host,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


RATIO_KEYS = ("rps", "p50_ms", "p99_ms")


def ratios(
    rows: Mapping[str, Mapping[str, Any]], pairs: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, float | None]]:
    """`label -> {rps, p50_ms, p99_ms}` of first / second, for the pairs whose cases both ran."""
    return {
        label: {key: ratio(rows[a][key], rows[b][key]) for key in RATIO_KEYS}
        for label, (a, b) in pairs.items()
        if a in rows and b in rows
    }


def target_verdicts(
    rows: Mapping[str, Mapping[str, Any]],
    pairs: Mapping[str, tuple[str, str]],
    labels: Sequence[str],
    target: float,
) -> dict[str, str]:
    """For each labelled pair that ran: whether first/second req/s reaches `target`, and if not,
    by how much it misses (in points of the second case's rate). Unrounded: 0.8998 misses 0.9."""
    out: dict[str, str] = {}
    for label in labels:
        a, b = pairs[label]
        if a not in rows or b not in rows or not rows[b].get("rps"):
            continue
        value = rows[a]["rps"] / rows[b]["rps"]
        if value >= target:
            out[label] = f"met ({value:.2%} >= {target:.0%})"
        else:
            out[label] = (
                f"MISSED by {(target - value) * 100:.2f} points ({value:.2%} < {target:.0%})"
            )
    return out
