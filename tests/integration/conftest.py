"""One real mesh per test session, shared by the integration tests."""

from __future__ import annotations

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
    runner.start()
    yield runner
    runner.stop()


@pytest.fixture
async def channel(mesh: MeshRunner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as ch:
        yield ch
