"""What tracing and metrics cost: a Gateway unary read through Envoy, everything on vs. off, in
one run.

    python bench/tracing_overhead.py [--rounds R] [-n N] [-c C] [-m M] [--sample S]
                                     [--on both|tracing|metrics] [--cases a,b] [-v]

Two meshes run side by side on loopback, sharing one PostgreSQL, NATS and OpenBao (started by
the first), so both read the same rows from the same database:

    off   `soma-mesh up`: no OTEL_EXPORTER_OTLP_ENDPOINT, SOMA_MESH_METRICS=0 (no /metrics)
    on    `soma-mesh up` with DATABASE_URL/NATS_URL/VAULT_* of `off` (its own Envoy, Gateway,
          Keys, Audit, worker), tracing to a tiny OTLP sink in this process (spans counted,
          then dropped) at SOMA_TRACE_SAMPLE=S, and Prometheus metrics served per replica

h2load then measures gRPC GetSession (API key) against both, the cases alternating round by
round (order reversed every other round) so drift does not favour one side:

    envoy-off / envoy-on     through each mesh's Envoy (the issue's number)
    direct-off / direct-on   straight to each gateway-0 (the services' own share, no Envoy)

On a shared machine req/s is noisy, so it also reads the CPU time gateway-0 and Envoy of the
measured mesh spent per request (/proc/<pid>/stat, over each whole round: its warm-up, the
measured run and the two check calls): the Gateway is the bottleneck, so off/on of its CPU per
request is the throughput ratio a quiet machine would show.

It prints the table, the on/off ratios and the verdict against the goal (on >= 90% of off's
req/s through Envoy), and writes summary.json under bench/results/<timestamp>-tracing/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/tracing_...`

from bench.h2load import LoadShape, grpc_frame
from bench.report import ratios, summary_row, target_verdicts
from bench.run import (
    BenchError,
    Case,
    LocalMesh,
    Round,
    Settings,
    add_load_options,
    add_run_options,
    check_run_options,
    combine,
    create_api_key,
    create_session,
    format_ratios,
    format_table,
    frame_path,
    grpc_request,
    part_address,
    prime,
    run_bench,
    run_round,
)
from services.mesh.openbao import root_token
from tests.otlp_collector import TraceCollector

logger = logging.getLogger("bench")

CASE_NAMES = ("envoy-off", "envoy-on", "direct-off", "direct-on")
RATIO_PAIRS = {
    "on/off through Envoy": ("envoy-on", "envoy-off"),
    "on/off direct": ("direct-on", "direct-off"),
}
TARGET = 0.9  # issue 6: >= 90% of the throughput with everything on
TARGET_LABELS = ("on/off through Envoy",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/tracing_overhead.py",
        description="GetSession through Envoy with tracing+metrics on vs off, in one run.",
    )
    add_load_options(parser, rounds=4)
    parser.add_argument(
        "--sample", type=float, default=1.0, help="SOMA_TRACE_SAMPLE of the `on` mesh (1.0)"
    )
    parser.add_argument(
        "--on",
        choices=("both", "tracing", "metrics"),
        default="both",
        help="what the `on` mesh turns on (both)",
    )
    add_run_options(parser, CASE_NAMES)
    args = parser.parse_args(argv)
    check_run_options(parser, args, CASE_NAMES)
    if not 0.0 <= args.sample <= 1.0:
        parser.error("--sample is a share between 0 and 1")
    return args


def shared_infra(state: dict[str, Any]) -> dict[str, str]:
    """The `off` mesh's PostgreSQL, NATS and OpenBao, as the environment of a second mesh."""
    urls = state.get("urls", {})
    token_file = urls.get("openbao_token_file")
    if not token_file:
        raise BenchError("the first mesh's state names no OpenBao token file")
    return {
        "DATABASE_URL": str(state["database_url"]),
        "NATS_URL": str(state["nats_url"]),
        "VAULT_ADDR": str(state["vault_addr"]),
        "VAULT_TOKEN": root_token(Path(token_file)),
        "SOMA_MESH_BOOTSTRAP": "0",  # the first mesh made the first credentials already
    }


def on_env(what: str, sample: float, sink: TraceCollector) -> dict[str, str]:
    env = dict(OFF_ENV)
    if what in ("both", "tracing"):
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "SOMA_TRACE_SAMPLE": f"{sample:g}"}
    if what in ("both", "metrics"):
        env["SOMA_MESH_METRICS"] = "1"
    return env


OFF_ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "SOMA_MESH_METRICS": "0"}


def metrics_served(state: dict[str, Any], part: str) -> bool:
    """Whether `part` of this mesh serves /metrics (the supervisor records the port)."""
    for p in state.get("parts", []):
        if p.get("name") == part:
            address = (p.get("extra") or {}).get("metrics")  # host:port
            if not address:
                return False
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                    return b"soma_rpc_requests_total" in r.read()
            except OSError:
                return False
    return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def part_pid(state: dict[str, Any], name: str) -> int:
    for part in state.get("parts", []):
        if part.get("name") == name and part.get("pid"):
            return int(part["pid"])
    raise BenchError(f"no pid of {name!r} in the mesh state")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def bench_in(h2load: str, workdir: Path) -> int:
        with TraceCollector(keep=0) as sink:
            return bench(args, h2load, workdir, sink)

    return run_bench(bench_in)


def bench(args: argparse.Namespace, h2load: str, workdir: Path, sink: TraceCollector) -> int:
    shape = LoadShape(
        requests=args.requests,
        clients=args.concurrency,
        streams=args.streams,
        threads=args.threads,
        duration=args.duration,
    )
    settings = Settings(shape, args.warmup, args.case_timeout, args.verbose, h2load)
    started = datetime.now(UTC)
    out_dir = args.out / (started.strftime("%Y%m%dT%H%M%SZ") + "-tracing")
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    off = LocalMesh(workdir, env=OFF_ENV, name="off")
    on: LocalMesh | None = None
    failures: dict[str, str] = {}
    rounds: dict[str, list[Round]] = {name: [] for name in args.cases}
    try:
        off_state = off.start(args.mesh_timeout)
        on = LocalMesh(
            workdir,
            env={**shared_infra(off_state), **on_env(args.on, args.sample, sink)},
            name="on",
        )
        on_state = on.start(args.mesh_timeout)
        api_key = create_api_key(off.data_dir)  # one database: valid in both meshes
        settings = Settings(
            shape, args.warmup, args.case_timeout, args.verbose, h2load, {api_key: "<api key>"}
        )
        session = create_session(str(off_state["listener"]), api_key)
        frame_path(out_dir, "GetSession").write_bytes(
            grpc_frame(grpc_request("GetSession", session.name).SerializeToString())
        )
        hosts = {
            "envoy-off": str(off_state["listener"]),
            "envoy-on": str(on_state["listener"]),
            "direct-off": part_address(off_state, "gateway-0"),
            "direct-on": part_address(on_state, "gateway-0"),
        }
        cases = {
            name: Case(name, f"GetSession, {name.replace('-', ' ')}", hosts[name], bearer=api_key)
            for name in args.cases
        }
        # Whose CPU each case is charged for: (gateway-0, Envoy) of the mesh it loads.
        pids = {
            name: (
                part_pid(st, "gateway-0"),
                part_pid(st, "envoy") if name.startswith("envoy") else None,
            )
            for name, st in (("-off", off_state), ("-on", on_state))
            for name in [n for n in args.cases if n.endswith(name)]
        }
        cpu: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in args.cases}
        for name, case in cases.items():
            if args.prime > 0:
                logger.info("priming %s with %d requests", name, args.prime)
                prime(case, session, out_dir, settings, args.prime)
        spans_before = sink.received
        for number in range(1, args.rounds + 1):
            order = args.cases if number % 2 else args.cases[::-1]
            for name in order:
                if name in failures:
                    continue
                logger.info("case %s round %d (%s)", name, number, cases[name].host)
                gateway, envoy = pids[name]
                before = (cpu_seconds(gateway), cpu_seconds(envoy) if envoy else 0.0)
                try:
                    rounds[name].append(
                        run_round(cases[name], number, session, workdir, out_dir, settings)
                    )
                    cpu[name][0] += cpu_seconds(gateway) - before[0]
                    cpu[name][1] += (cpu_seconds(envoy) - before[1]) if envoy else 0.0
                    cpu[name][2] += settings.warmup + len(rounds[name][-1].entries) + 2
                except BenchError as exc:
                    failures[name] = str(exc)
                    logger.error("case %s failed: %s", name, exc)
        time.sleep(1.0)  # the last batches of spans
        spans = sink.received - spans_before
        served = {
            m: metrics_served(st, "gateway-0") for m, st in (("off", off_state), ("on", on_state))
        }
        tags = {"loadgen": h2load, "mesh": "two meshes started by bench/tracing_overhead.py"}
        results = {
            name: combine(cases[name], rounds[name], session, settings, tags)
            for name in args.cases
            if name not in failures and rounds[name]
        }
    finally:
        for mesh in (on, off):
            if mesh is not None and not mesh.stop():
                failures[f"mesh {mesh.data_dir.name}"] = "did not stop on SIGTERM"
                (workdir / ".keep").touch()

    rows = {
        name: {
            **summary_row(result),
            "rps_rounds": [float(x) for x in result.tags["rps_per_round"].split(", ")],
            # CPU per request (µs) of the measured mesh's gateway-0 and Envoy
            "gateway_cpu_us": round(cpu[name][0] / cpu[name][2] * 1e6, 1),
            "envoy_cpu_us": round(cpu[name][1] / cpu[name][2] * 1e6, 1) if pids[name][1] else None,
        }
        for name, result in results.items()
    }
    ratio_values = ratios(rows, RATIO_PAIRS)
    for label, (on_case, off_case) in RATIO_PAIRS.items():
        if label in ratio_values:  # off/on: the req/s ratio a Gateway-bound quiet machine shows
            ratio_values[label]["gateway_cpu_off_over_on"] = round(
                rows[off_case]["gateway_cpu_us"] / rows[on_case]["gateway_cpu_us"], 3
            )
    verdicts = target_verdicts(rows, RATIO_PAIRS, TARGET_LABELS, TARGET)
    requests_on = sum(rows[n]["count"] for n in rows if n.endswith("-on"))
    summary = {
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "on": args.on,
        "trace_sample": args.sample,
        "spans_received": spans,
        "spans_per_measured_request_on": round(spans / requests_on, 2) if requests_on else None,
        "metrics_served": served,
        "parameters": {
            "requests": None if shape.duration else shape.requests,
            "duration_s": shape.duration,
            "connections": shape.clients,
            "streams_per_connection": shape.streams,
            "rounds": args.rounds,
            "warmup_requests": args.warmup,
            "prime_requests": args.prime,
        },
        "cases": rows,
        "ratios": ratio_values,
        "target": {"min_rps_ratio": TARGET, "verdicts": verdicts},
        "failures": failures,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(
        f"GetSession (API key), {shape.in_flight} in flight ({shape.clients}x{shape.streams}), "
        f"{args.rounds} round(s) x "
        + (f"{shape.duration:g}s" if shape.duration else f"{shape.requests} requests")
        + f"; on = {args.on}, sample {args.sample:g}; {os.cpu_count()} CPUs, "
        f"load avg before {load_before[0]:.2f}"
    )
    print(format_table(cases, rows))
    print()
    print(format_ratios(ratio_values))
    print("\nCPU per request (µs, whole rounds incl. warm-up):")
    for name, row in rows.items():
        envoy_cpu = "" if row["envoy_cpu_us"] is None else f", Envoy {row['envoy_cpu_us']:.0f}"
        print(f"  {name:<12} gateway-0 {row['gateway_cpu_us']:.0f}{envoy_cpu}")
    for label, values in ratio_values.items():
        print(f"  {label}: gateway CPU off/on x{values['gateway_cpu_off_over_on']:.2f}")
    print(
        f"\nspans exported by the `on` mesh while measured: {spans} "
        f"({summary['spans_per_measured_request_on']} per request); "
        f"/metrics served: off={served['off']} on={served['on']}"
    )
    for label, text in verdicts.items():
        print(f"issue 6 goal (on >= {TARGET:.0%} of off): {label}: {text}")
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    print(f"\nreport: {out_dir}/summary.json")
    return 1 if failures or any(row["errors"] for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
