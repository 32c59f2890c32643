"""The pure parts of bench/: gRPC framing, h2load output and log parsing, ghz-shaped reports."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from bench.h2load import (
    GRPC_HEADERS,
    LoadShape,
    LogEntry,
    bearer_header,
    build_command,
    grpc_frame,
    merge_summaries,
    missing_bodies,
    parse_log,
    parse_output,
    redact,
)
from bench.report import (
    GHZ_PERCENTILES,
    CaseResult,
    ghz_report,
    histogram,
    percentile,
    ratio,
    ratios,
    rfc3339,
    summary_row,
    target_verdicts,
)
from soma.gateway.v1 import gateway_pb2

ROOT = Path(__file__).resolve().parents[2]

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). 2000 total requests
Application protocol: h2c
progress: 100% done

finished in 629.24ms, 3178.46 req/s, 534.71KB/s
requests: 2000 total, 2000 started, 2000 done, 1990 succeeded, 10 failed, 4 errored, 0 timeout
status codes: 1994 2xx, 0 3xx, 0 4xx, 2 5xx
traffic: 336.46KB (344536) total, 6.15KB (6300) headers (space savings 96.11%), \
220.70KB (226000) data
                     min         max         mean         sd        +/- sd
time for request:     3.02ms     15.60ms      4.99ms      1.03ms    88.55%
"""


def make_summary(text: str = H2LOAD_OUTPUT):
    return parse_output(text)


# ---------------------------------------------------------------------------------------------
# framing and the h2load command


def test_grpc_frame_is_flag_length_then_message() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert grpc_frame(b"") == b"\x00\x00\x00\x00\x00"
    assert grpc_frame(b"x", compressed=True)[0] == 1


def test_grpc_frame_of_a_real_request_round_trips() -> None:
    request = gateway_pb2.GetSessionRequest(name="sessions/" + "a" * 36)
    frame = grpc_frame(request.SerializeToString())
    flag, length = struct.unpack(">BI", frame[:5])
    assert (flag, length) == (0, len(frame) - 5)
    assert gateway_pb2.GetSessionRequest.FromString(frame[5:]) == request


def test_grpc_frame_length_is_big_endian_for_large_messages() -> None:
    frame = grpc_frame(b"\x01" * 70_000)
    assert frame[1:5] == (70_000).to_bytes(4, "big")


def test_build_command_grpc_and_http1() -> None:
    shape = LoadShape(requests=500, clients=4, streams=8)
    argv = build_command(
        "http://h:1/p", shape, data_file="f.grpc", headers=GRPC_HEADERS, log_file="l.log"
    )
    assert argv[:9] == ["h2load", "-c", "4", "-m", "8", "-t", "1", "-n", "500"]
    assert argv[argv.index("-d") + 1] == "f.grpc"
    assert "content-type: application/grpc" in argv and "te: trailers" in argv
    assert argv[argv.index("--log-file") + 1] == "l.log"
    assert argv[-1] == "http://h:1/p"
    # HTTP/1.1 cannot multiplex: the same in-flight count as connections of one request each.
    h1 = build_command("http://h:1/r", shape, http1=True)
    assert h1[:7] == ["h2load", "--h1", "-c", "32", "-m", "1", "-t"]
    assert "-d" not in h1


def test_build_command_duration_and_warmup() -> None:
    shape = LoadShape(duration=10)
    argv = build_command("http://h:1/p", shape)
    assert argv[argv.index("-D") + 1] == "10" and "-n" not in argv
    warm = build_command("http://h:1/p", shape, requests=100)
    assert warm[warm.index("-n") + 1] == "100" and "-D" not in warm
    assert build_command("u", LoadShape(duration=2.5))[-2] == "2.5"


# ---------------------------------------------------------------------------------------------
# parsing h2load


def test_parse_output() -> None:
    s = make_summary()
    assert s.elapsed_s == pytest.approx(0.62924)
    assert s.rps == pytest.approx(3178.46)
    assert (s.total, s.started, s.done, s.succeeded) == (2000, 2000, 2000, 1990)
    assert (s.failed, s.errored, s.timeout) == (10, 4, 0)
    assert (s.status_2xx, s.status_3xx, s.status_4xx, s.status_5xx) == (1994, 0, 0, 2)
    assert (s.traffic_bytes, s.header_bytes, s.data_bytes) == (344536, 6300, 226000)


@pytest.mark.parametrize(("text", "seconds"), [("1.5s", 1.5), ("820us", 0.00082)])
def test_parse_output_time_units(text: str, seconds: float) -> None:
    s = make_summary(H2LOAD_OUTPUT.replace("629.24ms", text))
    assert s.elapsed_s == pytest.approx(seconds)


def test_parse_output_rejects_truncated_output() -> None:
    with pytest.raises(ValueError, match="status codes"):
        parse_output(H2LOAD_OUTPUT.split("status codes")[0])


def test_parse_log() -> None:
    lines = ["1795678588380241\t200\t3024\n", "\n", "1795678588380445\t-1\t4277\n"]
    entries = parse_log(lines)
    assert entries == [
        LogEntry(1795678588380241, 200, 3024),
        LogEntry(1795678588380445, -1, 4277),
    ]
    assert [e.ok for e in entries] == [True, False]
    with pytest.raises(ValueError, match="line 1"):
        parse_log(["1 200\n"])


def test_missing_bodies_counts_whole_bodies_only() -> None:
    s = make_summary()  # 1994 2xx, 226000 data bytes
    assert missing_bodies(s, 0) == 0
    assert missing_bodies(s, 226000 // 1994) == 0  # 113 * 1994 = 225322 <= 226000
    # Each good response is 120 bytes: 1994 * 120 = 239280, short by 13280 = 110.67 bodies.
    assert missing_bodies(s, 120) == 110


def test_merge_summaries_pools_rounds() -> None:
    one = make_summary()
    two = make_summary(H2LOAD_OUTPUT.replace("629.24ms", "1.5s"))
    merged = merge_summaries([one, two])
    assert merged.elapsed_s == pytest.approx(0.62924 + 1.5)
    assert merged.done == 4000 and merged.status_2xx == 3988 and merged.data_bytes == 452000
    assert merged.rps == pytest.approx(4000 / (0.62924 + 1.5))
    with pytest.raises(ValueError):
        merge_summaries([])


# ---------------------------------------------------------------------------------------------
# percentiles and the ghz report


def test_percentile_is_ghz_nearest_rank() -> None:
    values = list(range(1, 11))
    assert percentile(values, 10) == 1
    assert percentile(values, 25) == 3
    assert percentile(values, 50) == 5
    assert percentile(values, 90) == 9
    assert percentile(values, 99) == 10
    assert percentile([7], 50) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def log_lines(durations_us: list[int], statuses: list[int] | None = None) -> list[str]:
    statuses = statuses or [200] * len(durations_us)
    return [
        f"{1_700_000_000_000_000 + i}\t{status}\t{d}\n"
        for i, (d, status) in enumerate(zip(durations_us, statuses, strict=True))
    ]


def make_result(lines: list[str], **kw) -> CaseResult:
    summary = make_summary()
    return CaseResult(
        name="grpc-envoy",
        call="soma.gateway.v1.GatewayService.GetSession",
        host="127.0.0.1:8080",
        shape=LoadShape(requests=100, clients=4, streams=2),
        summary=summary,
        entries=parse_log(lines),
        data={"name": "sessions/x"},
        tags={"loadgen": "h2load"},
        **kw,
    )


def test_percentiles_from_a_log_skip_failed_requests() -> None:
    # 100 good requests of 1..100 ms, and 5 failed ones that were very slow.
    durations = [ms * 1000 for ms in range(1, 101)] + [900_000] * 5
    statuses = [200] * 100 + [-1] * 5
    result = make_result(log_lines(durations, statuses))
    assert result.percentile_ms(50) == 50.0
    assert result.percentile_ms(90) == 90.0
    assert result.percentile_ms(99) == 99.0
    assert result.ok_latencies_ns[0] == 1_000_000


def test_ghz_report_shape() -> None:
    durations = [ms * 1000 for ms in range(1, 101)] + [900_000]
    statuses = [200] * 100 + [503]
    result = make_result(log_lines(durations, statuses))
    report = ghz_report(result)
    json.dumps(report)  # serializable as is
    for key in (
        "name", "endReason", "date", "options", "count", "total", "average", "fastest",
        "slowest", "rps", "errorDistribution", "statusCodeDistribution",
        "latencyDistribution", "histogram", "details", "tags",
    ):  # fmt: skip
        assert key in report, key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["date"])
    assert report["count"] == 101
    assert report["total"] == 629_240_000  # ns, like Go's time.Duration
    assert report["fastest"] == 1_000_000 and report["slowest"] == 100_000_000
    assert isinstance(report["average"], int)
    assert report["rps"] == pytest.approx(101 / 0.62924)
    dist = report["latencyDistribution"]
    assert [d["percentage"] for d in dist] == list(GHZ_PERCENTILES)
    assert {d["percentage"]: d["latency"] for d in dist}[50] == 50_000_000
    assert report["statusCodeDistribution"] == {"OK": 100, "HTTP 503": 1}
    options = report["options"]
    assert options["call"] == "soma.gateway.v1.GatewayService.GetSession"
    assert options["host"] == "127.0.0.1:8080"
    assert options["insecure"] is True
    assert (options["total"], options["concurrency"], options["connections"]) == (100, 8, 4)
    assert options["data"] == {"name": "sessions/x"}
    assert sum(b["count"] for b in report["histogram"]) == 100
    assert report["tags"] == {"loadgen": "h2load"}


def test_ghz_report_flags_2xx_without_body() -> None:
    result = make_result(log_lines([1000] * 10), expected_body_bytes=120)
    report = ghz_report(result)
    # make_summary's byte count is 110 bodies short of its 1994 2xx; 10 log entries cap it.
    assert report["statusCodeDistribution"] == {"HTTP 200 without body": 10}
    assert any("grpc-status" in k for k in report["errorDistribution"])
    assert result.errors >= 110


def test_ghz_report_of_duration_run_has_duration_not_total() -> None:
    result = make_result(log_lines([1000, 2000]))
    result = CaseResult(**{**result.__dict__, "shape": LoadShape(duration=5)})
    options = ghz_report(result)["options"]
    assert options["duration"] == 5_000_000_000 and "total" not in options


def test_histogram_marks_span_fastest_to_slowest() -> None:
    values = [ms * 1_000_000 for ms in range(1, 101)]
    buckets = histogram(values)
    assert len(buckets) == 11
    assert buckets[0]["mark"] == pytest.approx(0.001)
    assert buckets[-1]["mark"] == pytest.approx(0.1)
    assert sum(b["count"] for b in buckets) == 100
    assert sum(b["frequency"] for b in buckets) == pytest.approx(1.0)
    assert histogram([]) == []


def test_summary_row_and_ratio() -> None:
    row = summary_row(make_result(log_lines([2000, 4000, 6000])))
    assert row["p50_ms"] == 4.0 and row["p99_ms"] == 6.0
    assert row["status_codes"] == {"2xx": 1994, "3xx": 0, "4xx": 0, "5xx": 2}
    assert row["errors"] == 10  # h2load's 10 failed (non-2xx and errored)
    assert ratio(2500, 5000) == 0.5
    assert ratio(None, 1) is None and ratio(1, 0) is None


def test_ratios_only_for_pairs_that_ran() -> None:
    rows = {
        "apikey": {"rps": 2700.0, "p50_ms": 45.0, "p99_ms": 60.0},
        "health": {"rps": 3000.0, "p50_ms": 40.0, "p99_ms": None},
    }
    pairs = {"apikey/health": ("apikey", "health"), "jwt/health": ("jwt", "health")}
    assert ratios(rows, pairs) == {
        "apikey/health": {"rps": 0.9, "p50_ms": 1.125, "p99_ms": None},
    }


def test_target_verdicts_say_by_how_much_a_ratio_misses() -> None:
    rows = {
        "health": {"rps": 1000.0},
        "exact": {"rps": 900.0},
        "borderline": {"rps": 899.8},  # 0.8998: rounds to 0.900 but misses
        "slow": {"rps": 577.0},
        "idle": {"rps": 0.0},
    }
    pairs = {
        "exact": ("exact", "health"),
        "borderline": ("borderline", "health"),
        "slow": ("slow", "health"),
        "by-zero": ("slow", "idle"),
        "missing": ("jwt", "health"),
    }
    verdicts = target_verdicts(rows, pairs, list(pairs), 0.9)
    assert verdicts["exact"] == "met (90.00% >= 90%)"
    assert verdicts["borderline"] == "MISSED by 0.02 points (89.98% < 90%)"
    assert verdicts["slow"] == "MISSED by 32.30 points (57.70% < 90%)"
    assert set(verdicts) == {"exact", "borderline", "slow"}  # not measured: no verdict


def test_credentials_go_in_a_header_and_never_in_saved_commands() -> None:
    key, jwt = "soma_dev_abcdefghijklmnop_secret", "eyJhbGciOi.payload.sig"
    argv = build_command(
        "http://h/x", LoadShape(), headers=(*GRPC_HEADERS, bearer_header(key), bearer_header(jwt))
    )
    assert "authorization: Bearer " + key in argv
    shown = redact(argv, {key: "<api key>", jwt: "<jwt>", "": "<never>"})
    assert key not in " ".join(shown) and jwt not in " ".join(shown)
    assert shown[shown.index("authorization: Bearer <api key>") - 1] == "-H"
    assert "authorization: Bearer <jwt>" in shown
    assert len(shown) == len(argv)


def test_rfc3339() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    plus2 = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus2)) == "2026-01-02T03:04:05+02:00"


# ---------------------------------------------------------------------------------------------
# the ghz scenarios: valid config files whose call and data match the contract


def _pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen" / "soma.binpb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


SCENARIOS = sorted((ROOT / "bench" / "scenarios").glob("*.json"))


def test_there_are_read_write_and_reflection_scenarios() -> None:
    names = {p.name for p in SCENARIOS}
    assert {"get-session.json", "get-session-reflection.json"} <= names
    assert {"create-session.json", "send-message.json"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_scenario_matches_the_contract(path: Path) -> None:
    config = json.loads(path.read_text())
    assert config["insecure"] is True
    assert re.fullmatch(r"127\.0\.0\.1:\d+", config["host"])
    assert config["total"] > 0 and config["concurrency"] >= config.get("connections", 1)
    if "reflection" in path.name:
        assert "protoset" not in config and "proto" not in config
    else:
        assert config["protoset"] == "gen/soma.binpb"
    service, method = config["call"].rsplit(".", 1)
    descriptor = _pool().FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    # Templates are evaluated by ghz per request; any string stands in for them here.
    data = json.loads(re.sub(r"\{\{[^}]*\}\}", "1", json.dumps(config["data"])))
    json_format.ParseDict(data, request_class())
