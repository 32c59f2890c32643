"""A stand-in for a Soma Python part, used by tests/integration/test_mesh_supervisor.py.

Reads SOMA_HOST/SOMA_PORT like the real servers, serves grpc.health.v1 (SERVING for ""),
and on SIGTERM flips to NOT_SERVING, stops with a short grace and exits 0.
Run: `python -m tests.integration.mesh_fake_service`.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve() -> None:
    host = os.environ.get("SOMA_HOST", "127.0.0.1")
    port = int(os.environ.get("SOMA_PORT", "0"))
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(
        f"fake {os.environ.get('SOMA_REPLICA')} serving on {host}:{bound} "
        f"db={os.environ.get('DATABASE_URL')} nats={os.environ.get('NATS_URL')} "
        f"vault={os.environ.get('VAULT_ADDR')} partitions={os.environ.get('SOMA_PARTITIONS')}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await servicer.enter_graceful_shutdown()
    await server.stop(float(os.environ.get("SOMA_GRACE_SECONDS", "1")))
    print("fake server stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(serve())
