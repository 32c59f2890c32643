"""Retries of UNAVAILABLE for idempotent reads, as a gRPC service config.

gRPC's own retry machinery (not a loop in Python): it replays only calls that never reached a
handler or failed with a listed code, honours the call's deadline across attempts, and adds
jitter to the backoff. Only unary Get*/List* methods are listed; writes are never retried
(a write that timed out may have happened; retry it yourself with the same `request_id`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor

READ_PREFIXES = ("Get", "List")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # the first call included; gRPC caps this at 5
    initial_backoff: float = 0.2  # seconds
    max_backoff: float = 2.0
    multiplier: float = 2.0


def read_methods(services: Iterable[ServiceDescriptor]) -> list[tuple[str, str]]:
    """(service full name, method) of every unary Get*/List* method."""
    return [
        (service.full_name, method.name)
        for service in services
        for method in service.methods
        if method.name.startswith(READ_PREFIXES)
        and not method.client_streaming
        and not method.server_streaming
    ]


def service_config(services: Iterable[ServiceDescriptor], policy: RetryPolicy) -> str:
    methods = read_methods(services)
    if policy.max_attempts < 2 or not methods:
        return json.dumps({})
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s, "method": m} for s, m in methods],
                    "retryPolicy": {
                        "maxAttempts": policy.max_attempts,
                        "initialBackoff": f"{policy.initial_backoff}s",
                        "maxBackoff": f"{policy.max_backoff}s",
                        "backoffMultiplier": policy.multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )
