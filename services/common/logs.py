"""Structured logging: every line carries the service, replica, the current request id and
the current trace id (empty outside a trace, or with tracing off).

Handlers are configured only here, at a process's entry point; modules just use
`logging.getLogger(__name__)`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

from services.common.config import LogConfig
from services.common.tracing import current_trace_id

# Set by the telemetry interceptor for the duration of one call.
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class _ContextFilter(logging.Filter):
    def __init__(self, service: str, replica: str) -> None:
        super().__init__()
        self.service = service
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.replica = self.replica
        record.request_id = request_id_var.get()
        record.trace_id = trace_id = current_trace_id()
        # Text lines show the trace id only when there is one: `[request id trace=<id>]`.
        record.trace_tag = f" trace={trace_id}" if trace_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": getattr(record, "service", "-"),
            "replica": getattr(record, "replica", "-"),
            "request_id": getattr(record, "request_id", "-"),
            "trace_id": getattr(record, "trace_id", ""),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = (
    "%(asctime)s %(levelname)-5s %(replica)s [%(request_id)s%(trace_tag)s] %(name)s: %(message)s"
)


def configure_logging(config: LogConfig, service: str, replica: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service, replica))
    handler.setFormatter(JsonFormatter() if config.json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # asyncpg/nats are chatty at DEBUG; keep them at INFO unless asked otherwise.
    for noisy in ("asyncio", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
