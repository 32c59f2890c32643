"""Audit emitting settings, read once at start from an environment mapping.

| variable                      | default                     | meaning                            |
|-------------------------------|-----------------------------|------------------------------------|
| SOMA_AUDIT                    | on                          | `off` disables auditing entirely   |
| SOMA_AUDIT_FAIL_CLOSED        | mutations                   | `off`: mutations never refused     |
| SOMA_AUDIT_PUBLISH_TIMEOUT_MS | 500                         | bound on every JetStream wait      |
| SOMA_AUDIT_READ_SAMPLE        | 0.1                         | share of allowed reads recorded    |
| SOMA_AUDIT_OUTBOX_DIR         | <SOMA_DATA_DIR>/audit-outbox| where `<replica>.log` is kept      |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError

FAIL_CLOSED_MODES = ("mutations", "off")
_ON = {"on", "true", "1", "yes"}
_OFF = {"off", "false", "0", "no"}


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    fail_closed: bool = True  # refuse a mutation whose event cannot be made durable in time
    publish_timeout: float = 0.5  # seconds
    # Every read audited halved an authenticated read's throughput on 2 cores (publish + ingest
    # per read); denials and mutations are always recorded, so sample allowed reads by default.
    read_sample: float = 0.1
    outbox_dir: Path = Path(".soma") / "audit-outbox"


def _switch(env: Mapping[str, str], name: str, default: bool, on: set[str]) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in on:
        return True
    if raw in _OFF:
        return False
    raise ConfigError(f"{name}={raw!r}: use {' or '.join(sorted(on))} or off")


def load_audit_config(env: Mapping[str, str]) -> AuditConfig:
    raw_timeout = env.get("SOMA_AUDIT_PUBLISH_TIMEOUT_MS", "").strip() or "500"
    try:
        timeout_ms = float(raw_timeout)
    except ValueError:
        raise ConfigError(
            f"SOMA_AUDIT_PUBLISH_TIMEOUT_MS={raw_timeout!r} is not a number"
        ) from None
    if not 1 <= timeout_ms <= 60_000:
        raise ConfigError(f"SOMA_AUDIT_PUBLISH_TIMEOUT_MS={raw_timeout} must be 1..60000")
    raw_sample = env.get("SOMA_AUDIT_READ_SAMPLE", "").strip() or "0.1"
    try:
        sample = float(raw_sample)
    except ValueError:
        raise ConfigError(f"SOMA_AUDIT_READ_SAMPLE={raw_sample!r} is not a number") from None
    if not 0.0 <= sample <= 1.0:
        raise ConfigError(f"SOMA_AUDIT_READ_SAMPLE={raw_sample} must be between 0 and 1")
    outbox = env.get("SOMA_AUDIT_OUTBOX_DIR", "").strip()
    data_dir = Path(env.get("SOMA_DATA_DIR", "").strip() or ".soma")
    return AuditConfig(
        enabled=_switch(env, "SOMA_AUDIT", True, _ON),
        fail_closed=_switch(env, "SOMA_AUDIT_FAIL_CLOSED", True, {"mutations", *_ON}),
        publish_timeout=timeout_ms / 1000.0,
        read_sample=sample,
        outbox_dir=Path(outbox) if outbox else data_dir / "audit-outbox",
    )
