"""One real mesh per test session, shared by the integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.harness import MeshRunner, authed_channel
from tests.otlp_collector import TraceCollector


@pytest.fixture(scope="session")
def trace_collector() -> Iterator[TraceCollector]:
    """An in-process OTLP collector the mesh exports every span to (started before it)."""
    with TraceCollector() as collector:
        yield collector


@pytest.fixture(scope="session")
def mesh(trace_collector: TraceCollector) -> Iterator[MeshRunner]:
    # Not under /root: pgserver makes every parent of its data dir readable (see STACK.md).
    base = Path(tempfile.mkdtemp(prefix="soma-it-", dir="/tmp"))
    # Every read audited, so the audit tests can count reads too (the default samples 0.1).
    # Every request traced (tests/integration/test_tracing.py); spans exported within 0.2 s.
    env = {
        "SOMA_AUDIT_READ_SAMPLE": "1.0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": trace_collector.endpoint,
        "SOMA_TRACE_SAMPLE": "1.0",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    runner = MeshRunner(base / "data", env=env)
    try:
        runner.start()
        runner.admin_key = runner.create_key(tenant="default", roles=("admin",))
        yield runner
    finally:
        runner.stop()
        # Logs of a failed run are worth keeping: SOMA_KEEP_TEST_DATA=1 keeps everything.
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_key(mesh: MeshRunner) -> str:
    """An admin API key of tenant `default`, made as an operator would."""
    return mesh.admin_key


@pytest.fixture
async def channel(mesh: MeshRunner, admin_key: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to Envoy whose calls carry the admin key (unless they set their own)."""
    async with authed_channel(mesh.grpc_target, admin_key) as ch:
        yield ch
