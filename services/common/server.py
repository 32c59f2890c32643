"""The grpc.aio server every service runs: health, reflection, interceptors, graceful stop.

`create_server` builds and starts a server on a port (0 = any free one) and returns it with the
bound port, so tests can run a service in-process; `serve` is the process entry point: it adds
logging, runs until SIGTERM/SIGINT, then drains (health NOT_SERVING first, so Envoy stops sending
new calls, then in-flight calls get `grace_seconds` to finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.common import metrics, tracing
from services.common.config import Config, load_config
from services.common.interceptors import StreamOwnerInterceptor, build_interceptors
from services.common.logs import configure_logging
from services.common.reflection import enable_reflection
from services.common.runtime import Runtime, open_runtime

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def drain_and_stop(self, grace_seconds: float, drain_delay: float = 0.0) -> None:
        await self.health.enter_graceful_shutdown()
        # Keep accepting calls while load balancers notice NOT_SERVING, then stop taking new
        # ones and give in-flight calls `grace_seconds`.
        await asyncio.sleep(drain_delay)
        await self.server.stop(grace_seconds)


Register = Callable[[aio.Server], None]


async def create_server(
    config: Config,
    service_names: Sequence[str],
    register: Register,
    interceptors: Sequence[aio.ServerInterceptor] | None = None,
) -> RunningServer:
    """Builds, binds and starts a server; health starts NOT_SERVING until `set_serving(True)`."""
    options = [
        ("grpc.max_receive_message_length", config.server.max_message_bytes),
        ("grpc.max_send_message_length", config.server.max_message_bytes),
        # Envoy keeps long-lived HTTP/2 connections; let it ping idle ones.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    server = aio.server(
        # The stream owner first: it writes a streaming call's responses and closes the chain of
        # generators in the call's own task (grpc.aio leaves a generator it stopped writing
        # unclosed, for Python to close later in another context: every `finally` of the chain
        # would run there). Tracing next: the whole call, every log line included, runs
        # inside its span. Metrics next: they see the final code of every call, refusals by
        # authn/authz too.
        interceptors=[
            StreamOwnerInterceptor(),
            *tracing.server_interceptors(),
            *metrics.server_interceptors(),
            *(interceptors if interceptors is not None else build_interceptors()),
        ],
        options=options,
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server, [*service_names, HEALTH_SERVICE])
    address = f"{config.server.host}:{config.server.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    await server.start()
    running = RunningServer(server, port, health, tuple(service_names))
    await running.set_serving(False)
    return running


def setup_metrics(config: Config) -> int | None:
    """Names this process in its metrics and, when SOMA_METRICS_PORT is set, serves them on
    loopback. Call before `create_server`: the RPC metrics interceptor is added only then."""
    metrics.init(config.service)
    if not config.server.metrics_port:
        return None
    port = metrics.start_metrics_server(config.server.metrics_port)
    log.info("metrics on http://127.0.0.1:%d/metrics", port)
    return port


@dataclass
class ServiceParts:
    """What a service's `open` returns: its names, how to register it, how to close it."""

    service_names: Sequence[str]
    register: Register
    close: Callable[[], Awaitable[None]]


# open(runtime) -> ServiceParts. The runtime holds what every service shares (database pool,
# NATS, authentication, authorization) and `draining`, set when SIGTERM arrives so long
# streams can end cleanly instead of being cut at the end of the grace period.
Opener = Callable[[Runtime], Awaitable[ServiceParts]]


async def _serve(config: Config, env: Mapping[str, str], opener: Opener) -> None:
    stop = asyncio.Event()
    draining = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    setup_metrics(config)
    runtime = await open_runtime(config, env, draining)
    metrics.watch_pool(runtime.pool)
    try:
        parts = await opener(runtime)
        runtime.serving()  # migrations done: bound every wait on PostgreSQL from now on
        try:
            running = await create_server(
                config, parts.service_names, parts.register, runtime.interceptors()
            )
            await running.set_serving(True)
            # Printed (not only logged) so a supervisor that asked for port 0 can read it.
            print(f"SOMA_READY {config.service} {config.server.host}:{running.port}", flush=True)
            log.info("%s serving on %s:%d", config.service, config.server.host, running.port)
            await stop.wait()
            log.info(
                "draining: health NOT_SERVING, %.0fs grace for in-flight calls",
                config.server.grace_seconds,
            )
            draining.set()
            await running.drain_and_stop(
                config.server.grace_seconds, config.server.drain_delay_seconds
            )
        finally:
            with contextlib.suppress(Exception):
                await parts.close()
    finally:
        with contextlib.suppress(Exception):
            await runtime.close()
    log.info("stopped")


def serve(service: str, opener: Opener) -> None:
    """Process entry point of a service."""
    config = load_config(service, os.environ)
    configure_logging(config.log, service, config.server.replica)
    log.info("starting %s with %s", service, config.server)
    tracing.setup_tracing(service, config.server.replica, os.environ)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(config, os.environ, opener))
    finally:
        tracing.shutdown_tracing()  # spans still buffered are exported (bounded)


def unimplemented_note(method: str, issue: int) -> str:
    return f"{method} is part of the contract but not implemented yet (issue #{issue})"


__all__ = [
    "RunningServer",
    "ServiceParts",
    "create_server",
    "serve",
    "setup_metrics",
    "unimplemented_note",
]
