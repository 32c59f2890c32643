"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tracing


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """Tracing on for one test, exporting to memory (read after `provider.force_flush()`)."""
    exporter = InMemorySpanExporter()
    provider = tracing.setup_tracing("gateway", "gateway-7", {}, exporter=exporter)
    assert provider is not None
    try:
        yield provider, exporter
    finally:
        tracing.shutdown_tracing()
