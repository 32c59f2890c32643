"""Wires the Audit service together: migrations, the AUDIT stream and its writer, retention,
the servicer."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from grpc import aio

from services.audit.ingest import CONSUMER, Writer, WriterSettings, ensure_audit_stream
from services.audit.retention import Retention
from services.audit.servicer import AuditServicer
from services.audit.store import MIGRATIONS, AuditStore
from services.common import metrics
from services.common.audit.event import STREAM
from services.common.config import ConfigError
from services.common.db import migrate
from services.common.runtime import Runtime
from services.common.server import ServiceParts
from services.common.tasks import cancel_and_wait
from soma.audit.v1 import audit_pb2_grpc

SERVICE_NAME = "soma.audit.v1.AuditService"


@dataclass(frozen=True)
class AuditSettings:
    batch: int = 1000  # events per fetch and per transaction
    purge_interval: float = 3600.0  # seconds between retention rounds


def load_settings(env: dict[str, str] | os._Environ[str]) -> AuditSettings:
    try:
        batch = int(env.get("SOMA_AUDIT_BATCH", "") or 1000)
        interval = float(env.get("SOMA_AUDIT_PURGE_INTERVAL_SECONDS", "") or 3600)
    except ValueError as error:
        raise ConfigError(
            f"SOMA_AUDIT_BATCH / SOMA_AUDIT_PURGE_INTERVAL_SECONDS: {error}"
        ) from None
    if not 1 <= batch <= 10_000 or interval <= 0:
        raise ConfigError("SOMA_AUDIT_BATCH must be 1..10000 and the purge interval positive")
    return AuditSettings(batch, interval)


async def open_audit(runtime: Runtime, settings: AuditSettings | None = None) -> ServiceParts:
    settings = settings or load_settings(os.environ)
    async with runtime.pool.acquire() as conn:
        await migrate(conn, "audit", MIGRATIONS)
    await ensure_audit_stream(runtime.bus)
    store = AuditStore(runtime.pool)
    retention = Retention(runtime.pool)
    writer = Writer(runtime.bus, store, WriterSettings(batch=settings.batch))
    servicer = AuditServicer(store, retention, runtime.bus, runtime.draining)
    tasks = [
        asyncio.create_task(writer.run(), name="audit-writer"),
        asyncio.create_task(retention.run(settings.purge_interval), name="audit-retention"),
        *metrics.lag_samplers(runtime.bus.js, [(STREAM, CONSUMER)]),
    ]

    def register(server: aio.Server) -> None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)

    async def close() -> None:
        await cancel_and_wait(tasks)

    return ServiceParts([SERVICE_NAME], register, close)
