"""Added latency of an audited mutation vs the same call with auditing off.

    python bench/audit_overhead.py [-n 5000] [--concurrency 1] [--rounds 10] [--json]

Starts its own nats-server (JetStream, temp dir, free port) and two in-process grpc.aio servers
with the same interceptor chain (telemetry -> errors -> authn stand-in -> authz (real policy) ->
handler), one with the `audit` slot (AuditInterceptor + AuditRecorder: fail-closed gate + one
JetStream publish awaited until acked) and one without. A trivial mutating handler
(GatewayService.SendMessage). Calls alternate between the servers in rounds so that drift hits
both; prints p50/p99 per side (ms) and the p50 difference. Goal: p50 within 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen" / "python")]

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from services.common.audit.interceptor import AuditHooks, AuditInterceptor  # noqa: E402
from services.common.audit.recorder import AuditRecorder  # noqa: E402
from services.common.audit.settings import AuditConfig  # noqa: E402
from services.common.auth.authz import AuthzInterceptor, PolicyEngine  # noqa: E402
from services.common.auth.principal import Principal, current_principal  # noqa: E402
from services.common.config import NatsConfig, load_config  # noqa: E402
from services.common.contract import SERVICES  # noqa: E402
from services.common.events import connect  # noqa: E402
from services.common.interceptors import build_interceptors  # noqa: E402
from services.common.server import create_server  # noqa: E402
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from soma.gateway.v1 import resources_pb2 as gw  # noqa: E402

PRINCIPAL = Principal(
    subject="key:bench",
    tenant="bench",
    roles=frozenset({"member"}),
    scopes=frozenset({"*"}),
    credential="api_key",
    key_id="bench",
)


NATS_BIN = str(Path(sys.executable).parent / "nats-server")


class StaticAuthn(aio.ServerInterceptor):
    """Authentication stand-in (its cost is the same on both sides)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        current_principal.set(PRINCIPAL)
        return await continuation(details)


class Toy(gateway_pb2_grpc.GatewayServiceServicer):
    async def SendMessage(self, request: Any, context: Any) -> gw.Message:
        return gw.Message(name=f"{request.parent}/messages/m1", content="ok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nats(store: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [NATS_BIN, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"nats://127.0.0.1:{port}"
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("nats-server did not start")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(n: int, concurrency: int, rounds: int, work: Path, url: str) -> dict[str, Any]:
    bus = await connect(NatsConfig((url,)), "bench-audit")
    config = AuditConfig(publish_timeout=0.5, outbox_dir=work / "outbox")
    recorder = await AuditRecorder.open(bus, config, "bench-0")
    engine = PolicyEngine()
    chains = {
        "off": build_interceptors(authn=StaticAuthn(), authz=AuthzInterceptor(engine)),
        "on": build_interceptors(
            authn=StaticAuthn(),
            authz=AuthzInterceptor(engine, on_deny=AuditHooks(recorder).denied),
            audit=AuditInterceptor(recorder),
        ),
    }
    servers, stubs, channels = [], {}, []
    for side, chain in chains.items():
        running = await create_server(
            load_config("gateway", {"SOMA_PORT": "0"}),
            [SERVICES["gateway"]],
            lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Toy(), s),
            chain,
        )
        channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
        servers.append(running)
        channels.append(channel)
        stubs[side] = gateway_pb2_grpc.GatewayServiceStub(channel)
    request = gateway_pb2.SendMessageRequest(
        parent="sessions/s1", message=gw.Message(content="hello")
    )
    samples: dict[str, list[float]] = {"off": [], "on": []}

    async def worker(side: str, calls: int) -> None:
        stub = stubs[side]
        for _ in range(calls):
            started = time.perf_counter()
            await stub.SendMessage(request)
            samples[side].append((time.perf_counter() - started) * 1000)

    for side in stubs:  # warm-up: connections, policy cache, JetStream inbox
        await asyncio.gather(*(worker(side, 50) for _ in range(concurrency)))
    samples = {"off": [], "on": []}
    per_round = max(1, n // rounds // concurrency)
    for _ in range(rounds):
        for side in ("off", "on"):
            await asyncio.gather(*(worker(side, per_round) for _ in range(concurrency)))
    published = recorder.published
    for channel in channels:
        await channel.close()
    for running in servers:
        await running.server.stop(0)
    await recorder.close()
    await bus.close()
    result: dict[str, Any] = {"calls_per_side": len(samples["on"]), "concurrency": concurrency}
    for side, values in samples.items():
        result[side] = {
            "p50_ms": round(statistics.median(values), 3),
            "p99_ms": round(pct(values, 0.99), 3),
            "mean_ms": round(statistics.fmean(values), 3),
        }
    result["added_p50_ms"] = round(result["on"]["p50_ms"] - result["off"]["p50_ms"], 3)
    result["added_p99_ms"] = round(result["on"]["p99_ms"] - result["off"]["p99_ms"], 3)
    result["events_published"] = published
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="calls per side")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="soma-audit-bench-"))
    proc, url = start_nats(work / "nats")
    try:
        result = asyncio.run(measure(args.n, args.concurrency, args.rounds, work, url))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"audited mutation vs unaudited, {result['calls_per_side']} calls per side, "
          f"concurrency {result['concurrency']}")  # fmt: skip
    for side in ("off", "on"):
        r = result[side]
        print(f"  audit {side:3}: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    print(f"  added: p50 {result['added_p50_ms']:+.3f} ms  p99 {result['added_p99_ms']:+.3f} ms")


if __name__ == "__main__":
    main()
