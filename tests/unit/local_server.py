"""A servicer on a local gRPC port, for CLI and SDK tests that talk to a fake service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc


@asynccontextmanager
async def serving(
    add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any
) -> AsyncIterator[str]:
    """Serves `servicer` (added with a generated `add_*Servicer_to_server`) on 127.0.0.1 and
    yields its target; stops the server on exit."""
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
