"""h2load as a gRPC/REST load generator: the command line, the request file, the output parsers.

h2load (Debian `nghttp2-client`) speaks HTTP/2 and HTTP/1.1 only, but a unary gRPC call is just a
POST whose body is one length-prefixed message. h2load counts HTTP 2xx as success and never looks
at the `grpc-status` trailer, so the runner checks gRPC status separately (see run.py); it prints
no percentiles either, so they are computed here from its `--log-file`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: flag byte, 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


@dataclass(frozen=True)
class LoadShape:
    """The h2load parameters shared by every case of a run."""

    requests: int = 20_000  # -n (ignored when duration is set)
    clients: int = 16  # -c: connections
    streams: int = 8  # -m: concurrent streams per connection
    threads: int = 1  # -t
    duration: float | None = None  # -D seconds instead of -n

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


def build_command(
    url: str,
    shape: LoadShape,
    *,
    data_file: str | None = None,
    headers: Sequence[str] = (),
    http1: bool = False,
    log_file: str | None = None,
    requests: int | None = None,
    h2load: str = "h2load",
) -> list[str]:
    """The h2load argv for one case (or its warm-up, with `requests` and no log file).

    Over HTTP/1.1 there is no multiplexing (`-m` would mean pipelining), so the same number of
    requests in flight is reached with clients x streams connections of one request each.
    """
    argv = [h2load]
    if http1:
        argv += ["--h1", "-c", str(shape.in_flight), "-m", "1"]
    else:
        argv += ["-c", str(shape.clients), "-m", str(shape.streams)]
    argv += ["-t", str(shape.threads)]
    if requests is not None:
        argv += ["-n", str(requests)]
    elif shape.duration is not None:
        argv += ["-D", _seconds(shape.duration)]
    else:
        argv += ["-n", str(shape.requests)]
    if data_file is not None:
        argv += ["-d", data_file]
    for header in headers:
        argv += ["-H", header]
    if log_file is not None:
        argv += ["--log-file", log_file]
    argv.append(url)
    return argv


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class H2loadSummary:
    """What h2load prints at the end of a run."""

    elapsed_s: float
    rps: float
    total: int
    started: int
    done: int
    succeeded: int  # HTTP 2xx
    failed: int  # non-2xx and errored
    errored: int
    timeout: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    traffic_bytes: int
    header_bytes: int
    data_bytes: int  # response bodies (DATA frame payload) received


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_TRAFFIC = re.compile(r"traffic: \S+ \((\d+)\) total, \S+ \((\d+)\) headers.*?\S+ \((\d+)\) data")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_output(text: str) -> H2loadSummary:
    """Parses h2load's stdout; raises ValueError if a summary line is missing."""

    def need(pattern: re.Pattern[str]) -> re.Match[str]:
        match = pattern.search(text)
        if match is None:
            raise ValueError(f"h2load output has no line matching {pattern.pattern!r}")
        return match

    finished = need(_FINISHED)
    req = [int(x) for x in need(_REQUESTS).groups()]
    status = [int(x) for x in need(_STATUS).groups()]
    traffic = [int(x) for x in need(_TRAFFIC).groups()]
    return H2loadSummary(
        elapsed_s=float(finished.group(1)) * _UNIT[finished.group(2)],
        rps=float(finished.group(3)),
        total=req[0],
        started=req[1],
        done=req[2],
        succeeded=req[3],
        failed=req[4],
        errored=req[5],
        timeout=req[6],
        status_2xx=status[0],
        status_3xx=status[1],
        status_4xx=status[2],
        status_5xx=status[3],
        traffic_bytes=traffic[0],
        header_bytes=traffic[1],
        data_bytes=traffic[2],
    )


@dataclass(frozen=True)
class LogEntry:
    """One line of h2load's `--log-file`: when the request started, its status, how long."""

    start_us: int  # wall clock, microseconds since the epoch
    status: int  # HTTP status; -1 when the stream failed without one
    duration_us: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def parse_log(lines: Iterable[str]) -> list[LogEntry]:
    """Parses `--log-file` lines (tab-separated start µs, status, duration µs)."""
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"log line {number}: expected 3 tab-separated fields: {line!r}")
        start, status, duration = (int(f) for f in fields)
        entries.append(LogEntry(start, status, duration))
    return entries


def missing_bodies(summary: H2loadSummary, expected_body_bytes: int) -> int:
    """How many 2xx responses came without the expected body, estimated from the byte count.

    A gRPC error through Envoy is HTTP 200 with an empty body and a non-zero grpc-status, which
    h2load counts as success; every good response here carries the same bytes, so a shortfall
    in the received DATA bytes tells how many such responses there were.
    """
    if expected_body_bytes <= 0:
        return 0
    # Whole bodies only: a few bytes short means sizes vary (they should not), not an error.
    shortfall = summary.status_2xx * expected_body_bytes - summary.data_bytes
    return max(0, shortfall // expected_body_bytes)


def merge_summaries(summaries: Sequence[H2loadSummary]) -> H2loadSummary:
    """Several runs of one case as one: counts and times add up, req/s is done / elapsed."""
    if not summaries:
        raise ValueError("nothing to merge")
    elapsed = sum(s.elapsed_s for s in summaries)
    done = sum(s.done for s in summaries)

    def total(attr: str) -> int:
        return sum(getattr(s, attr) for s in summaries)

    return H2loadSummary(
        elapsed_s=elapsed,
        rps=done / elapsed if elapsed else 0.0,
        **{
            name: total(name)
            for name in H2loadSummary.__dataclass_fields__
            if name not in ("elapsed_s", "rps")
        },
    )


def bearer_header(credential: str) -> str:
    """The h2load `-H` value that sends an API key or a JWT the way our authn reads it."""
    return f"authorization: Bearer {credential}"


def redact(argv: Sequence[str], secrets: dict[str, str]) -> list[str]:
    """The argv with every secret replaced by its placeholder, for logs and saved reports.

    Commands are kept in results/ so they can be re-run; a key or token must not be kept with
    them (put yours back in place of `<api key>` / `<jwt>`).
    """
    out = []
    for arg in argv:
        for secret, placeholder in secrets.items():
            if secret:
                arg = arg.replace(secret, placeholder)
        out.append(arg)
    return out
