"""Streams a client cancels, tracing on: every `finally` of the interceptor chain runs in the
call's own task, so no "Failed to detach context", no `ContextVar.reset` failing from another
context, and every server span ends (CANCELLED).

grpc.aio stops iterating a response generator whose write failed (the client left while a
response was on its way) without closing it; Python then closed the chain's generators from new
tasks, in copies of the call's context. With tracing on, replicas crashed after such errors
(services.common.interceptors.StreamOwnerInterceptor has the details)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.common.config import load_config
from services.common.server import RunningServer, create_server

SERVICE = "test.Streams"
BIG = b"x" * 256_000  # a few of these fill the flow-control windows: the server's write waits
CANCELS = 50


async def flood(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    while True:  # until the client leaves: it is writing when it does
        yield BIG


async def wait(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()  # e.g. an install waiting for an approval


async def chat(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield b"first"
        while True:
            yield BIG


async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return b"done"


async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"pong"


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        "Flood": grpc.unary_stream_rpc_method_handler(flood),
        "Wait": grpc.unary_stream_rpc_method_handler(wait),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = tracing.setup_tracing("capsule", "capsule-0", {}, exporter=exporter)
    assert provider is not None
    try:
        yield provider, exporter
    finally:
        tracing.shutdown_tracing()


@pytest.fixture
def warnings_and_errors() -> Iterator[_Records]:
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
async def server(spans: Any) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    running = await create_server(load_config("capsule", {"SOMA_PORT": "0"}), [SERVICE], _register)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.server.stop(0)


async def _requests() -> AsyncIterator[bytes]:
    yield b"hello"
    await asyncio.Event().wait()  # the client never ends its side: it cancels


async def test_cancelled_streams_close_their_chain_in_the_call(
    server: Any, spans: Any, warnings_and_errors: _Records
) -> None:
    _, channel = server
    calls: list[tuple[str, Any]] = []
    for method in ("Flood", "Wait", "Chat"):
        for _ in range(CANCELS if method == "Flood" else 10):
            if method == "Chat":
                call = channel.stream_stream(f"/{SERVICE}/Chat")(_requests())
            else:
                call = channel.unary_stream(f"/{SERVICE}/{method}")(b"")
            assert await call.read() == b"first"
            if method != "Wait":
                await asyncio.sleep(0.005)  # the server is blocked writing
            call.cancel()
            calls.append((method, call))
    for _ in range(10):
        upload = channel.stream_unary(f"/{SERVICE}/Upload")(_requests())
        await asyncio.sleep(0.005)
        upload.cancel()
        calls.append(("Upload", upload))

    # Whatever was left to close is closed once collected: the errors were logged then.
    gc.collect()
    await asyncio.sleep(0.3)
    gc.collect()
    await asyncio.sleep(0.1)

    assert await channel.unary_unary(f"/{SERVICE}/Ping")(b"") == b"pong"  # still serving
    problems = [
        f"{r.name}: {r.getMessage()}"
        for r in warnings_and_errors.records
        # grpc's own line for a write that failed before it noticed the cancel: not ours.
        if not r.getMessage().startswith("ExecuteBatchError raised in core")
    ]
    assert not [p for p in problems if "detach" in p], problems
    assert not problems, problems

    provider, exporter = spans
    provider.force_flush()
    ended: list[ReadableSpan] = [
        s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER
    ]
    by_method: dict[str, list[int]] = {}
    for span in ended:
        assert span.attributes is not None
        by_method.setdefault(span.name, []).append(int(span.attributes["rpc.grpc.status_code"]))  # type: ignore[arg-type]
    # Every cancelled call's span ended; a cancelled stream of responses as CANCELLED (an
    # upload the client cancelled ends as its handler does: grpc gives it the end of the stream).
    assert by_method.pop(f"/{SERVICE}/Ping") == [0]
    assert {m.rsplit("/", 1)[1]: len(codes) for m, codes in by_method.items()} == {
        "Flood": CANCELS,
        "Wait": 10,
        "Chat": 10,
        "Upload": 10,
    }
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    for method in ("Flood", "Wait", "Chat"):
        assert set(by_method[f"/{SERVICE}/{method}"]) == {cancelled}, method
