"""Wires the Gateway together: database, NATS, servicer and background relays."""

from __future__ import annotations

import asyncio

from grpc import aio

from services.common import metrics
from services.common.db import migrate
from services.common.runtime import Runtime
from services.common.server import ServiceParts
from services.common.tasks import cancel_and_wait
from services.gateway import queue
from services.gateway.relay import Publisher, run_reply_ingester
from services.gateway.servicer import GatewayServicer
from services.gateway.store import MIGRATIONS, SessionStore
from soma.gateway.v1 import gateway_pb2_grpc

SERVICE_NAME = "soma.gateway.v1.GatewayService"


async def open_gateway(runtime: Runtime) -> ServiceParts:
    config, pool, bus, draining = runtime.config, runtime.pool, runtime.bus, runtime.draining
    async with pool.acquire() as conn:
        await migrate(conn, "gateway", MIGRATIONS)
    await queue.ensure_queue(bus.js, config.partitions)
    store = SessionStore(pool)
    publisher = Publisher(bus, store)
    servicer = GatewayServicer(
        store,
        bus,
        publisher,
        config.partitions,
        config.server.replica,
        draining,
    )
    tasks = [
        asyncio.create_task(publisher.run_outbox(), name="outbox"),
        asyncio.create_task(run_reply_ingester(bus, store, publisher), name="replies"),
        # Every SESSIONS consumer's lag, the workers' too: it must show while they are down.
        *metrics.lag_samplers(
            bus.js,
            [(queue.STREAM, queue.REPLIES_CONSUMER)]
            + [(queue.STREAM, queue.worker_consumer(p)) for p in range(config.partitions)],
        ),
    ]

    def register(server: aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)

    async def close() -> None:
        await cancel_and_wait(tasks)

    return ServiceParts([SERVICE_NAME], register, close)
