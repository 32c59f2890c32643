"""Health probes, one per kind of part. Each returns (healthy, detail) and never raises."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    detail: str


async def grpc_health(address: str, service: str = "", wait_s: float = 2.0) -> ProbeResult:
    """grpc.health.v1 Check(service) == SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=wait_s)
    except grpc.aio.AioRpcError as exc:
        return ProbeResult(False, f"grpc {exc.code().name}: {exc.details()}")
    except Exception as exc:
        return ProbeResult(False, f"grpc error: {exc}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return ProbeResult(resp.status == health_pb2.HealthCheckResponse.SERVING, status)


def _http_get(url: str, wait_s: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=wait_s) as resp:
            return int(resp.status), resp.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(4096).decode(errors="replace")


async def http_ok(url: str, wait_s: float = 2.0) -> ProbeResult:
    """An HTTP GET answering 200."""
    try:
        code, body = await asyncio.to_thread(_http_get, url, wait_s)
    except Exception as exc:
        return ProbeResult(False, f"GET {url}: {exc}")
    return ProbeResult(code == 200, f"HTTP {code} {body.strip()[:80]}")


async def openbao_health(addr: str, wait_s: float = 2.0) -> ProbeResult:
    """/v1/sys/health: 200 = initialized, unsealed, active."""
    url = addr.rstrip("/") + "/v1/sys/health"
    try:
        code, body = await asyncio.to_thread(_http_get, url, wait_s)
    except Exception as exc:
        return ProbeResult(False, f"GET {url}: {exc}")
    meaning = {
        200: "active",
        429: "standby",
        501: "not initialized",
        503: "sealed",
    }.get(code, f"HTTP {code}")
    try:
        info = json.loads(body)
        if isinstance(info, dict) and "version" in info:
            meaning += f" (OpenBao {info['version']})"
    except ValueError:
        pass
    return ProbeResult(code == 200, meaning)


async def postgres_connect(database_url: str, wait_s: float = 3.0) -> ProbeResult:
    """A real connection and `SELECT 1`."""
    import asyncpg

    try:
        conn = await asyncpg.connect(database_url, timeout=wait_s)
    except Exception as exc:
        return ProbeResult(False, f"connect: {exc}")
    try:
        version = await conn.fetchval("SHOW server_version", timeout=wait_s)
        return ProbeResult(True, f"PostgreSQL {version}")
    except Exception as exc:
        return ProbeResult(False, f"query: {exc}")
    finally:
        await conn.close(timeout=wait_s)


async def tcp_connect(host: str, port: int, wait_s: float = 2.0) -> ProbeResult:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait_s)
    except Exception as exc:
        return ProbeResult(False, f"connect {host}:{port}: {exc}")
    writer.close()
    return ProbeResult(True, "accepting connections")
