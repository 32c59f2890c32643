"""One real mesh per test session, shared by the integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.harness import MeshRunner


@pytest.fixture(scope="session")
def mesh() -> Iterator[MeshRunner]:
    # Not under /root: pgserver makes every parent of its data dir readable (see STACK.md).
    base = Path(tempfile.mkdtemp(prefix="soma-it-", dir="/tmp"))
    runner = MeshRunner(base / "data")
    try:
        runner.start()
        yield runner
    finally:
        runner.stop()
        # Logs of a failed run are worth keeping: SOMA_KEEP_TEST_DATA=1 keeps everything.
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def channel(mesh: MeshRunner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as ch:
        yield ch
