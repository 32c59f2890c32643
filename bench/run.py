"""Benchmark Gateway unary reads with h2load: direct, Envoy, REST, bare grpcio, authenticated
(API key, JWT) against public calls.

    python bench/run.py [--requests N] [--concurrency C] [--streams M] [--duration S]
                        [--state PATH [--api-key KEY]] [--cases a,b] [-v]

Without --state it starts its own mesh (`python -m services.mesh up --replicas 1` on free
loopback ports, data under /tmp) and stops it at the end; with --state it uses the mesh whose
`run/state.json` is given. It makes an API key (`python -m services.mesh admin create-key`;
with --state, --api-key or SOMA_API_KEY instead if given), exchanges it for a JWT (IssueToken),
creates one session, then measures, one case after another with the same h2load parameters:

    grpc-direct        gRPC (h2c) GetSession straight to gateway-0, API key
    grpc-envoy         gRPC GetSession through Envoy's listener, API key
    rest-envoy-h2      REST `GET /v1/sessions/<id>` through Envoy (transcoder), h2c, API key
    rest-envoy-h1      the same over HTTP/1.1
    grpc-bare          a bare grpc.aio server answering a constant Session (bench/bare_server.py)
    health-envoy       gRPC GetHealth through Envoy, public, no credential (pings Postgres)
    version-envoy      gRPC GetVersion through Envoy, public, no credential, no I/O
    grpc-envoy-apikey  = grpc-envoy (API key), under its issue-3 name
    grpc-envoy-jwt     gRPC GetSession through Envoy with a JWT from IssueToken

Prints a table and the ratios, and writes ghz-shaped JSON per case plus summary.json to
bench/results/<timestamp>/. README.md in this directory explains the numbers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/run.py`

import grpc

from bench.h2load import (
    GRPC_HEADERS,
    H2loadSummary,
    LoadShape,
    LogEntry,
    bearer_header,
    build_command,
    grpc_frame,
    merge_summaries,
    parse_log,
    parse_output,
    redact,
)
from bench.report import CaseResult, ghz_report, ratios, summary_row, target_verdicts

try:
    from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc, resources_pb2
    from soma.keys.v1 import keys_pb2, keys_pb2_grpc
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gen" / "python"))
    from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc, resources_pb2
    from soma.keys.v1 import keys_pb2, keys_pb2_grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
GATEWAY = "soma.gateway.v1.GatewayService"
METHODS = ("GetSession", "GetHealth", "GetVersion")  # the unary reads measured
CASE_NAMES = (
    "grpc-direct", "grpc-envoy", "rest-envoy-h2", "rest-envoy-h1", "grpc-bare",
    "health-envoy", "version-envoy", "grpc-envoy-apikey", "grpc-envoy-jwt",
)  # fmt: skip
TOKEN_TTL_S = 3600  # IssueToken's maximum; a run is minutes

# first / second; req/s and p50/p99 of both come from the same run
RATIO_PAIRS = {
    "envoy/direct (gRPC)": ("grpc-envoy", "grpc-direct"),
    "rest-h2/grpc through Envoy": ("rest-envoy-h2", "grpc-envoy"),
    "rest-h1/grpc through Envoy": ("rest-envoy-h1", "grpc-envoy"),
    "direct/bare-grpcio": ("grpc-direct", "grpc-bare"),
    "apikey/health": ("grpc-envoy-apikey", "health-envoy"),
    "jwt/health": ("grpc-envoy-jwt", "health-envoy"),
    "apikey/version": ("grpc-envoy-apikey", "version-envoy"),
    "jwt/version": ("grpc-envoy-jwt", "version-envoy"),
    "jwt/apikey": ("grpc-envoy-jwt", "grpc-envoy-apikey"),
    "health/version": ("health-envoy", "version-envoy"),
}
# Issue 3's target: the authenticated read at >= 90% of the health call's rate.
TARGET = 0.9
TARGET_LABELS = ("apikey/health", "jwt/health")


class BenchError(Exception):
    """The benchmark cannot go on (mesh did not start, a check failed, ...)."""


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    host: str  # host:port the load goes to
    rest: bool = False
    http1: bool = False
    method: str = "GetSession"  # a GatewayService method with an empty or `name` request
    bearer: str | None = field(default=None, repr=False)  # API key or JWT; None: public call
    credential: str = "API key"  # what `bearer` is, for the reports

    def url(self, session_name: str) -> str:
        if self.rest:
            return f"http://{self.host}/v1/{session_name}"
        return f"http://{self.host}/{GATEWAY}/{self.method}"

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.bearer}")] if self.bearer else []

    @property
    def headers(self) -> tuple[str, ...]:
        grpc_headers = () if self.rest else GRPC_HEADERS
        return grpc_headers + ((bearer_header(self.bearer),) if self.bearer else ())


# ---------------------------------------------------------------------------------------------
# processes we start: the mesh supervisor and the bare server (each in its own session)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The mesh finds envoy, nats-server, bao and postgres next to the interpreter (the venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class LocalMesh:
    """`python -m services.mesh up` in a new session; stopped with SIGTERM to its pid. `env`
    is added to its environment (e.g. tracing on); `name` tells several meshes apart."""

    def __init__(
        self, workdir: Path, env: dict[str, str] | None = None, name: str = "mesh"
    ) -> None:
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}-up.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []

    @property
    def state_path(self) -> Path:
        return self.data_dir / "run" / "state.json"

    def start(self, timeout: float) -> dict[str, Any]:
        self.argv = [
            sys.executable, "-m", "services.mesh", "up",
            "--data-dir", str(self.data_dir),
            "--port", str(free_port()),
            "--admin-port", str(free_port()),
            "--replicas", "1",
        ]  # fmt: skip
        logger.info("starting the mesh: %s", shlex.join(self.argv))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env={**_child_env(), **self.env}, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"soma-mesh up exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            state = _read_json(self.state_path)
            if state and state.get("status") == "ready":
                logger.info("mesh ready in %.1fs", timeout - (deadline - time.monotonic()))
                return state
            if state and state.get("status") in ("failed", "stopped"):
                raise BenchError(f"mesh is {state['status']}: {state.get('error')}")
            time.sleep(0.5)
        raise BenchError(f"mesh not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 90.0) -> bool:
        """SIGTERM to the supervisor, wait for it; True if it exited by itself."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        logger.info("stopping the mesh (SIGTERM to pid %d)", self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Its process group is ours (new session); parts in their own groups it must stop.
            logger.error("mesh did not stop in %.0fs; killing its process group", timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return False
        if code != 0:
            logger.warning("soma-mesh up exited with %d:\n%s", code, self.log_tail())
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class BareServer:
    """bench/bare_server.py in a new session."""

    def __init__(self, session: resources_pb2.Session, log_path: Path) -> None:
        self.session = session
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> str:
        b64 = base64.b64encode(self.session.SerializeToString()).decode()
        argv = [sys.executable, str(BENCH / "bare_server.py"), "--session-b64", b64]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        # The first line is `{"address": ...}` once it serves; readline blocks, so bound it.
        line = _readline_with_timeout(self.proc, timeout)
        try:
            return str(json.loads(line)["address"])
        except (ValueError, KeyError) as exc:
            raise BenchError(f"bare server did not start: {line!r} (log {self.log_path})") from exc

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _readline_with_timeout(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_state(path: Path) -> dict[str, Any]:
    state = _read_json(path)
    if state is None:
        raise BenchError(f"cannot read mesh state {path}")
    if state.get("status") != "ready":
        raise BenchError(f"mesh in {path} is {state.get('status')!r}, not 'ready'")
    return state


def part_address(state: dict[str, Any], name: str) -> str:
    for part in state.get("parts", []):
        if part.get("name") == name:
            return str(part["address"])
    raise BenchError(f"no part {name!r} in the mesh state")


# ---------------------------------------------------------------------------------------------
# real calls: the session, and the per-case check that h2load's 2xx are real successes


def create_api_key(data_dir: Path, timeout: float = 60.0) -> str:
    """A fresh admin key for the bench, straight from the mesh's data dir (its secret text)."""
    argv = [
        sys.executable, "-m", "services.mesh", "admin", "create-key",
        "--data-dir", str(data_dir), "--json", "--role", "admin", "--name", "bench",
    ]  # fmt: skip
    logger.info("creating an API key: %s", shlex.join(argv))
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"admin create-key did not finish in {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"admin create-key exited with {done.returncode}: {done.stderr[-500:]}")
    try:
        secret = str(json.loads(done.stdout)["secret"])
    except (ValueError, KeyError) as exc:
        raise BenchError(f"admin create-key printed no secret: {done.stdout[:200]!r}") from exc
    if not secret.startswith("soma_"):
        raise BenchError("admin create-key's secret is not an API key (soma_...)")
    return secret


def issue_token(listener: str, api_key: str) -> str:
    """A JWT for the key, from the public IssueToken through Envoy."""
    request = keys_pb2.IssueTokenRequest(
        api_key=api_key, ttl=duration_pb2.Duration(seconds=TOKEN_TTL_S)
    )
    with grpc.insecure_channel(listener) as channel:
        try:
            reply = keys_pb2_grpc.KeysServiceStub(channel).IssueToken(request, timeout=10)
        except grpc.RpcError as exc:
            raise BenchError(
                f"IssueToken via {listener}: {exc.code().name} {exc.details()}"
            ) from exc
    if not reply.access_token:
        raise BenchError("IssueToken returned no access_token")
    return str(reply.access_token)


def create_session(listener: str, api_key: str, timeout: float = 30.0) -> resources_pb2.Session:
    request = gateway_pb2.CreateSessionRequest(
        session=resources_pb2.Session(display_name="bench", labels={"bench": "get-session"}),
        request_id=str(uuid.uuid4()),
    )
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(listener) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        while True:
            try:
                # The same request_id makes a retry return the first session.
                return stub.CreateSession(
                    request, timeout=10, metadata=[("authorization", f"Bearer {api_key}")]
                )
            except grpc.RpcError as exc:
                if time.monotonic() > deadline or exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise BenchError(f"CreateSession through {listener}: {exc}") from exc
                time.sleep(0.5)


def grpc_request(method: str, session_name: str) -> Message:
    if method == "GetSession":
        return gateway_pb2.GetSessionRequest(name=session_name)
    if method == "GetHealth":
        return gateway_pb2.GetHealthRequest()
    if method == "GetVersion":
        return gateway_pb2.GetVersionRequest()
    raise ValueError(f"unknown method {method}")


def reply_problem(method: str, reply: Message, session_name: str) -> str | None:
    """Why a reply is not the good one (None when it is): the load must measure successes."""
    if isinstance(reply, resources_pb2.Session) and reply.name != session_name:
        return f"returned {reply.name!r}, not {session_name!r}"
    if (
        isinstance(reply, resources_pb2.Health)
        and reply.status != resources_pb2.Health.STATUS_SERVING
    ):
        return f"health is {resources_pb2.Health.Status.Name(reply.status)}"
    if not reply.ByteSize():
        return "returned an empty reply"
    return None


def check_grpc(case: Case, session_name: str) -> int:
    """One real call of the case's method; returns the bytes of its response body (the frame)."""
    with grpc.insecure_channel(case.host) as channel:
        call = getattr(gateway_pb2_grpc.GatewayServiceStub(channel), case.method)
        try:
            reply = call(
                grpc_request(case.method, session_name), timeout=10, metadata=case.metadata
            )
        except grpc.RpcError as exc:
            raise BenchError(
                f"{case.method} via {case.host}: {exc.code().name} {exc.details()}"
            ) from exc
    problem = reply_problem(case.method, reply, session_name)
    if problem:
        raise BenchError(f"{case.method} via {case.host} {problem}")
    return len(grpc_frame(reply.SerializeToString()))


def check_rest(case: Case, session_name: str) -> int:
    """One real `GET /v1/sessions/<id>` (HTTP/1.1); returns the bytes of the JSON body."""
    url = case.url(session_name)
    request = urllib.request.Request(url, headers=dict(case.metadata))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            status = response.status
    except OSError as exc:
        raise BenchError(f"GET {url}: {exc}") from exc
    if status != 200 or json.loads(body).get("name") != session_name:
        raise BenchError(f"GET {url}: HTTP {status} {body[:200]!r}")
    return len(body)


# ---------------------------------------------------------------------------------------------
# running h2load


@dataclass(frozen=True)
class Settings:
    shape: LoadShape
    warmup: int
    case_timeout: float
    verbose: bool
    h2load: str
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # secret -> placeholder

    def shown(self, argv: list[str]) -> str:
        """The command as logs and reports show it: no key or token in it."""
        return shlex.join(redact(argv, self.secrets))


def run_h2load(argv: list[str], settings: Settings, timeout: float | None = None) -> str:
    timeout = settings.case_timeout if timeout is None else timeout
    if settings.verbose:
        print(f"$ {settings.shown(argv)}", flush=True)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it already
        raise BenchError(f"h2load did not finish in {timeout:.0f}s") from exc
    if done.returncode != 0 and "finished in" not in done.stdout:
        raise BenchError(f"h2load exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass(frozen=True)
class Round:
    """One measured h2load run of a case."""

    summary: H2loadSummary
    entries: list[LogEntry]
    argv: list[str]
    expected_body_bytes: int
    check_after: str


def frame_path(out_dir: Path, method: str) -> Path:
    return out_dir / f"{method}Request.grpc"


def h2load_options(case: Case, out_dir: Path, settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "http1": case.http1, "h2load": settings.h2load, "headers": case.headers,
    }  # fmt: skip
    if not case.rest:
        options["data_file"] = str(frame_path(out_dir, case.method))
    return options


def checker(case: Case) -> Callable[[Case, str], int]:
    return check_rest if case.rest else check_grpc


def run_round(
    case: Case,
    number: int,
    session: resources_pb2.Session,
    workdir: Path,
    out_dir: Path,
    settings: Settings,
) -> Round:
    """A real call (fails loudly if the path does not work), a warm-up, the measured run."""
    check = checker(case)
    expected = check(case, session.name)
    options = h2load_options(case, out_dir, settings)
    url = case.url(session.name)
    if settings.warmup > 0:
        warm = build_command(url, settings.shape, requests=settings.warmup, **options)
        warm_summary = parse_output(run_h2load(warm, settings))
        if warm_summary.succeeded < warm_summary.done:
            logger.warning("%s: warm-up had %d non-2xx", case.name, warm_summary.failed)
    log_file = workdir / f"{case.name}.{number}.log"
    argv = build_command(url, settings.shape, log_file=str(log_file), **options)
    output = run_h2load(argv, settings)
    text_file = out_dir / f"{case.name}.round{number}.h2load.txt"
    text_file.write_text(f"$ {settings.shown(argv)}\n{output}")
    summary = parse_output(output)
    with log_file.open() as lines:
        entries = parse_log(lines)
    log_file.unlink()
    try:
        check(case, session.name)
        after = "ok"
    except BenchError as exc:
        after = f"FAILED: {exc}"
        logger.error("%s: the check after the load failed: %s", case.name, exc)
    logger.info("%s round %d: %.0f req/s", case.name, number, len(entries) / summary.elapsed_s)
    return Round(summary, entries, argv, expected, after)


def prime(
    case: Case, session: resources_pb2.Session, out_dir: Path, settings: Settings, n: int
) -> None:
    """Load a freshly started path once before anything is measured (its first seconds are
    measurably slower: connection pools, caches)."""
    checker(case)(case, session.name)
    argv = build_command(
        case.url(session.name),
        settings.shape,
        requests=n,
        **h2load_options(case, out_dir, settings),
    )
    run_h2load(argv, settings)


def combine(
    case: Case, rounds: list[Round], session: resources_pb2.Session, settings: Settings,
    tags: dict[str, str],
) -> CaseResult:  # fmt: skip
    """All rounds of a case as one result: pooled requests, pooled time."""
    summary = merge_summaries([r.summary for r in rounds])
    url = case.url(session.name)
    per_round = [len(r.entries) / r.summary.elapsed_s for r in rounds]
    return CaseResult(
        name=case.name,
        call=f"{GATEWAY}.{case.method}",
        host=case.host,
        # ghz's total/duration: what the whole case got, over all rounds
        shape=replace(
            settings.shape,
            requests=settings.shape.requests * len(rounds),
            duration=settings.shape.duration * len(rounds) if settings.shape.duration else None,
        ),
        summary=summary,
        entries=[e for r in rounds for e in r.entries],
        # Every round checked the same bytes; a differing one would show as short bodies.
        expected_body_bytes=min(r.expected_body_bytes for r in rounds),
        data={"name": session.name} if case.method == "GetSession" else {},
        tags={
            **tags,
            "case": case.title,
            "request": f"GET {url}" if case.rest else f"POST {url} (gRPC frame)",
            "credential": case.credential if case.bearer else "none (public method)",
            "protocol": "HTTP/1.1" if case.http1 else "HTTP/2 cleartext (h2c)",
            "command": settings.shown(rounds[-1].argv),
            "rounds": str(len(rounds)),
            "rps_per_round": ", ".join(f"{x:.1f}" for x in per_round),
            "check_before": "ok",
            "check_after": "; ".join(sorted({r.check_after for r in rounds})),
            "expected_body_bytes": str(rounds[0].expected_body_bytes),
            "data_bytes": str(summary.data_bytes),
        },
    )


# ---------------------------------------------------------------------------------------------
# output


def format_table(cases: dict[str, Case], rows: dict[str, dict[str, Any]]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    spreads = {
        name: "/".join(f"{x:.0f}" for x in row.get("rps_rounds", [])) for name, row in rows.items()
    }
    wide = max([12, *(len(s) for s in spreads.values())]) + 2  # many rounds: a wider column
    header = f"{'case':<19}{'target':<31}{'req/s':>7}{'(rounds)':>{wide}}"
    header += f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    lines = [header + f"{'errors':>8}  status codes"]
    for name, row in rows.items():
        codes = ", ".join(f"{n} {k}" for k, n in row["status_codes"].items() if n) or "none"
        lines.append(
            f"{name:<19}{cases[name].title[:30]:<31}{num(row['rps'], '.0f'):>7}"
            f"{spreads[name]:>{wide}}"
            f"{num(row['p50_ms'], '.2f'):>9}{num(row['p90_ms'], '.2f'):>9}"
            f"{num(row['p99_ms'], '.2f'):>9}{row['errors']:>8}  {codes}"
        )
    return "\n".join(lines)


def format_ratios(values: dict[str, dict[str, float | None]]) -> str:
    def x(value: float | None) -> str:
        return "-" if value is None else f"x{value:.2f}"

    lines = ["ratios (first / second):"]
    for label, r in values.items():
        rps, p50, p99 = x(r["rps"]), x(r["p50_ms"]), x(r["p99_ms"])
        lines.append(f"  {label:<28} req/s {rps:<7} p50 {p50:<7} p99 {p99}")
    return "\n".join(lines)


def format_verdicts(verdicts: dict[str, str]) -> str:
    lines = [f"issue 3 target: authenticated read >= {TARGET:.0%} of the health call's req/s"]
    lines += [f"  {label:<28} {text}" for label, text in verdicts.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def add_load_options(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """The h2load load shape options every h2load benchmark here takes."""
    parser.add_argument("--requests", "-n", type=int, default=10_000, help="per run (10000)")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="connections (16)")
    parser.add_argument("--streams", "-m", type=int, default=8, help="streams per connection (8)")
    parser.add_argument("--duration", "-D", type=float, help="seconds per case instead of -n")
    parser.add_argument("--threads", "-t", type=int, default=1, help="h2load threads (1)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"runs of every case ({rounds})")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up requests per run")
    parser.add_argument(
        "--prime", type=int, default=10_000, help="requests to prime the servers first"
    )


def add_run_options(parser: argparse.ArgumentParser, case_names: Sequence[str]) -> None:
    """Which cases, where results go, and the time bounds."""
    parser.add_argument(
        "--cases", default=",".join(case_names), help=f"comma-separated subset of {case_names}"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="results root")
    parser.add_argument("--case-timeout", type=float, default=300.0, help="seconds per h2load")
    parser.add_argument("--mesh-timeout", type=float, default=240.0, help="seconds to be ready")
    parser.add_argument("-v", "--verbose", action="store_true", help="print h2load commands")


def check_run_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, case_names: Sequence[str]
) -> None:
    """Splits --cases and refuses unknown cases and non-positive load options."""
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(case_names)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if min(args.requests, args.concurrency, args.streams, args.threads, args.rounds) < 1:
        parser.error("--requests, --concurrency, --streams, --threads, --rounds must be >= 1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="h2load benchmark of a Gateway unary read: direct, Envoy, REST, bare grpcio.",
    )
    add_load_options(parser, rounds=2)
    parser.add_argument("--state", type=Path, help="use the running mesh of this state.json")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SOMA_API_KEY"),
        help="with --state: the key to use (default $SOMA_API_KEY, else one is created with "
        "`admin create-key` in the state file's data dir)",
    )
    parser.add_argument("--replica", default="gateway-0", help="part measured directly")
    add_run_options(parser, CASE_NAMES)
    args = parser.parse_args(argv)
    check_run_options(parser, args, CASE_NAMES)
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the finally blocks stop what we started


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="soma-bench-", dir="/tmp"))
    keep = False
    try:
        yield path
    except BaseException:
        keep = True
        raise
    finally:
        if keep or (path / ".keep").exists():
            logger.warning("kept %s for inspection", path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench(lambda h2load, workdir: bench(args, h2load, workdir))


def run_bench(bench_in: Callable[[str, Path], int]) -> int:
    """What every h2load runner's main does around `bench_in(h2load, workdir)`: logging, finding
    h2load, SIGTERM as an interrupt, a work dir kept on failure, and the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    h2load = shutil.which("h2load")
    if h2load is None:
        print("bench: h2load not found (Debian/Ubuntu: apt-get install nghttp2-client)",
              file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with _workdir() as workdir:
            return bench_in(h2load, workdir)
    except BenchError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


def bench(args: argparse.Namespace, h2load: str, workdir: Path) -> int:
    shape = LoadShape(
        requests=args.requests,
        clients=args.concurrency,
        streams=args.streams,
        threads=args.threads,
        duration=args.duration,
    )
    settings = Settings(shape, args.warmup, args.case_timeout, args.verbose, h2load)
    version = subprocess.run([h2load, "--version"], capture_output=True, text=True).stdout.strip()
    started = datetime.now(UTC)
    out_dir = args.out / started.strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    mesh: LocalMesh | None = None
    bare: BareServer | None = None
    failures: dict[str, str] = {}
    results: dict[str, CaseResult] = {}
    cases: dict[str, Case] = {}
    try:
        if args.state is not None:
            state = load_state(args.state)
        else:
            mesh = LocalMesh(workdir)
            state = mesh.start(args.mesh_timeout)
        listener = str(state["listener"])
        direct = part_address(state, args.replica)
        if mesh is None and args.api_key:
            api_key = str(args.api_key)
        else:  # <data dir>/run/state.json
            data_dir = mesh.data_dir if mesh else args.state.resolve().parent.parent
            api_key = create_api_key(data_dir)
        jwt = issue_token(listener, api_key)
        settings = replace(settings, secrets={api_key: "<api key>", jwt: "<jwt>"})
        session = create_session(listener, api_key)
        logger.info("session %s; Envoy %s, %s %s", session.name, listener, args.replica, direct)
        for method in METHODS:
            request = grpc_request(method, session.name)
            frame_path(out_dir, method).write_bytes(grpc_frame(request.SerializeToString()))
        cases |= {
            "grpc-direct": Case(
                "grpc-direct", f"gRPC direct to {args.replica}", direct, bearer=api_key
            ),
            "grpc-envoy": Case(
                "grpc-envoy", "gRPC through Envoy, API key", listener, bearer=api_key
            ),
            "rest-envoy-h2": Case(
                "rest-envoy-h2", "REST through Envoy (h2c)", listener, True, bearer=api_key
            ),
            "rest-envoy-h1": Case(
                "rest-envoy-h1",
                "REST through Envoy (HTTP/1.1)",
                listener,
                True,
                True,
                bearer=api_key,
            ),
            "health-envoy": Case(
                "health-envoy", "GetHealth via Envoy, public", listener, method="GetHealth"
            ),
            "version-envoy": Case(
                "version-envoy", "GetVersion via Envoy, public", listener, method="GetVersion"
            ),
            "grpc-envoy-apikey": Case(
                "grpc-envoy-apikey", "GetSession via Envoy, API key", listener, bearer=api_key
            ),
            "grpc-envoy-jwt": Case(
                "grpc-envoy-jwt",
                "GetSession via Envoy, JWT",
                listener,
                bearer=jwt,
                credential="JWT",
            ),
        }
        if "grpc-bare" in args.cases:
            bare = BareServer(session, workdir / "bare-server.log")
            # The same header as the real read, which the bare server ignores.
            cases["grpc-bare"] = Case(
                "grpc-bare", "bare grpc.aio, constant reply", bare.start(), bearer=api_key
            )
        tags = {"loadgen": version, "mesh": "started by bench/run.py" if mesh else str(args.state)}
        if args.prime > 0:
            for name in ("grpc-envoy", "grpc-bare"):
                if name in cases and name in args.cases:
                    logger.info("priming %s with %d requests", name, args.prime)
                    prime(cases[name], session, out_dir, settings, args.prime)
        rounds: dict[str, list[Round]] = {name: [] for name in args.cases}
        for number in range(1, args.rounds + 1):
            # Alternate the order so drift (warming, neighbours) does not favour one case.
            order = args.cases if number % 2 else args.cases[::-1]
            for name in order:
                if name in failures:
                    continue
                logger.info("case %s round %d: %s (%s)", name, number, cases[name].title,
                            cases[name].host)  # fmt: skip
                try:
                    rounds[name].append(
                        run_round(cases[name], number, session, workdir, out_dir, settings)
                    )  # fmt: skip
                except BenchError as exc:
                    failures[name] = str(exc)
                    logger.error("case %s failed: %s", name, exc)
        results = {
            name: combine(cases[name], rounds[name], session, settings, tags)
            for name in args.cases
            if name not in failures
        }
    finally:
        if bare is not None:
            bare.stop()
        if mesh is not None and not mesh.stop():
            failures["mesh"] = "the mesh did not stop on SIGTERM"
            (workdir / ".keep").touch()  # its files may still be in use

    rows = {
        name: {
            **summary_row(result),
            "rps_rounds": [float(x) for x in result.tags["rps_per_round"].split(", ")],
        }
        for name, result in results.items()
    }
    for name, result in results.items():
        (out_dir / f"{name}.json").write_text(json.dumps(ghz_report(result), indent=2) + "\n")
    ratio_values = ratios(rows, RATIO_PAIRS)
    verdicts = target_verdicts(rows, RATIO_PAIRS, TARGET_LABELS, TARGET)
    summary = {
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "loadgen": version,
        "parameters": {
            "requests": None if shape.duration else shape.requests,
            "duration_s": shape.duration,
            "connections": shape.clients,
            "streams_per_connection": shape.streams,
            "in_flight": shape.in_flight,
            "threads": shape.threads,
            "rounds": args.rounds,
            "warmup_requests": args.warmup,
            "prime_requests": args.prime,
        },
        "session": session.name,
        "cases": {
            name: {**rows[name], "title": cases[name].title, "command": result.tags["command"]}
            for name, result in results.items()
        },
        "ratios": ratio_values,
        "target": {"min_rps_ratio": TARGET, "verdicts": verdicts},
        "failures": failures,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(
        f"Gateway unary reads, {shape.in_flight} in flight ({shape.clients} connections x "
        f"{shape.streams} streams), "
        + f"{args.rounds} round(s) x "
        + (f"{shape.duration:g}s" if shape.duration else f"{shape.requests} requests")
        + f" per case, {os.cpu_count()} CPUs, load avg before {load_before[0]:.2f}; {version}"
    )
    print(format_table(cases, rows))
    print()
    print(format_ratios(ratio_values))
    if verdicts:
        print()
        print(format_verdicts(verdicts))
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    print(f"\nreports: {out_dir}/")
    return 1 if failures or any(row["errors"] for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
