"""A server for a service whose contract exists but whose implementation a later issue owns.

Every method answers UNIMPLEMENTED with the method's name and the issue that implements it;
health and reflection work, so Envoy, ghz and the supervisor see a live replica. This is an
honest answer, not a stub pretending to succeed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc import aio

from services.common.runtime import Runtime
from services.common.server import ServiceParts


def unimplemented_servicer(full_name: str, issue: int) -> Any:
    """An object with one async method per RPC of `full_name`, each aborting UNIMPLEMENTED."""
    service = descriptor_pool.Default().FindServiceByName(full_name)

    def make(method: str, server_streaming: bool) -> Callable[..., Any]:
        message = (
            f"{full_name}/{method} is part of the v1 contract but not implemented yet "
            f"(issue #{issue})"
        )

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            # A server-streaming handler must be an async generator, even one that yields
            # nothing, or the call fails with INTERNAL instead of UNIMPLEMENTED.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # pragma: no cover - unreachable, makes this an async generator

        return streaming if server_streaming else unary

    methods = {m.name: staticmethod(make(m.name, m.server_streaming)) for m in service.methods}
    return type(f"Unimplemented{service.name}", (), methods)()


def unimplemented_opener(
    full_name: str, add_to_server: Callable[[Any, aio.Server], None], issue: int
) -> Callable[[Runtime], Any]:
    async def open_service(runtime: Runtime) -> ServiceParts:
        servicer = unimplemented_servicer(full_name, issue)

        async def close() -> None:
            return None

        return ServiceParts([full_name], lambda server: add_to_server(servicer, server), close)

    return open_service
