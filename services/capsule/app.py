"""Wires the Capsule service together: settings, migrations, the approval policy, the archive
store on disk, the installer (and its start-up cleanup), the servicer."""

from __future__ import annotations

import logging
import os

from grpc import aio

from services.capsule.blobs import BlobStore
from services.capsule.installer import Installer
from services.capsule.policy import ApprovalPolicy
from services.capsule.servicer import CapsuleServicer
from services.capsule.settings import CapsuleSettings, load_settings
from services.capsule.store import MIGRATIONS, CapsuleStore
from services.common.db import migrate
from services.common.runtime import Runtime
from services.common.server import ServiceParts
from soma.capsule.v1 import capsule_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "soma.capsule.v1.CapsuleService"


async def open_capsule(runtime: Runtime, settings: CapsuleSettings | None = None) -> ServiceParts:
    settings = settings or load_settings(runtime.config, os.environ)
    policy = ApprovalPolicy(settings.policy_file)  # a broken policy stops the start, naming it
    async with runtime.pool.acquire() as conn:
        await migrate(conn, "capsule", MIGRATIONS)  # after auth (Authenticator.open applies it)
    store = CapsuleStore(runtime.pool)
    await store.prune_requests()
    blobs = BlobStore(settings.root, settings.replica)
    installer = Installer(
        store, blobs, settings, policy, runtime.bus, runtime.audit, runtime.draining
    )
    await installer.start()
    log.info(
        "capsules in %s (at most %d bytes per archive, approvals wait %s)",
        settings.root,
        settings.max_bytes,
        settings.approval_ttl,
    )
    servicer = CapsuleServicer(store, blobs, installer, settings, runtime.bus)

    def register(server: aio.Server) -> None:
        capsule_pb2_grpc.add_CapsuleServiceServicer_to_server(servicer, server)

    async def close() -> None:
        await installer.close()  # the pool and the NATS connection belong to the runtime

    return ServiceParts([SERVICE_NAME], register, close)
