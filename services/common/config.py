"""Configuration, read once at start-up from an environment mapping.

Each concern has its own frozen dataclass; nothing deeper in the code reads `os.environ`.
Secrets are `repr=False` so a logged config never shows them.

| variable             | default                 | meaning                                   |
|----------------------|-------------------------|-------------------------------------------|
| SOMA_HOST            | 127.0.0.1               | address the gRPC server binds             |
| SOMA_PORT            | per service (50051...)  | gRPC port; 0 picks a free one             |
| SOMA_REPLICA         | <service>-0             | replica name in logs and health answers   |
| SOMA_GRACE_SECONDS   | 10                      | drain time for in-flight calls on SIGTERM |
| SOMA_DRAIN_DELAY_SECONDS | 3                   | NOT_SERVING, still accepting, before stop |
| SOMA_MAX_MESSAGE_MB  | 4                       | largest gRPC message accepted             |
| SOMA_METRICS_PORT    | 0 (off)                 | Prometheus /metrics on 127.0.0.1; 0 = off |
| SOMA_LOG_LEVEL       | INFO                    | DEBUG, INFO, WARNING, ERROR               |
| SOMA_LOG_FORMAT      | text                    | text or json (one JSON object per line)   |
| SOMA_DATA_DIR        | ./.soma                 | the local mesh's data directory           |
| DATABASE_URL         | (none)                  | PostgreSQL URL (asyncpg form)             |
| SOMA_DB_POOL_MAX     | 10                      | connections per replica                   |
| SOMA_DEPENDENCY_TIMEOUT_MS | 3000              | max wait on PostgreSQL, NATS, OpenBao     |
| NATS_URL             | nats://127.0.0.1:4222   | NATS server(s), comma separated           |
| VAULT_ADDR           | (none)                  | OpenBao/Vault address                     |
| VAULT_TOKEN          | (none)                  | OpenBao/Vault token (secret)              |
| SOMA_PARTITIONS      | 4                       | session queue partitions                  |
| OTEL_EXPORTER_OTLP_ENDPOINT | (none: off)      | tracing: see services/common/tracing.py   |
| SOMA_TRACE_SAMPLE    | 1.0                     | share of new traces kept (tracing.py)     |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORTS = {"gateway": 50051, "keys": 50052, "audit": 50053, "capsule": 50054, "worker": 50055}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    replica: str
    grace_seconds: float
    drain_delay_seconds: float  # health NOT_SERVING but still serving, so Envoy moves away first
    max_message_bytes: int
    metrics_port: int = 0  # Prometheus /metrics on loopback; 0 = no metrics server


@dataclass(frozen=True)
class LogConfig:
    level: str
    json: bool


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = field(repr=False)  # may carry a password
    pool_max: int = 10


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...]


@dataclass(frozen=True)
class VaultConfig:
    addr: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    service: str
    server: ServerConfig
    log: LogConfig
    database: DatabaseConfig | None
    nats: NatsConfig
    vault: VaultConfig | None
    data_dir: Path
    partitions: int


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def load_config(service: str, env: Mapping[str, str]) -> Config:
    """Builds the configuration of `service` from `env` (normally `os.environ`)."""
    level = env.get("SOMA_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"SOMA_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    log_format = env.get("SOMA_LOG_FORMAT", "text").lower()
    if log_format not in {"text", "json"}:
        raise ConfigError(f"SOMA_LOG_FORMAT={log_format!r}: use text or json")
    database_url = env.get("DATABASE_URL", "").strip()
    vault_addr = env.get("VAULT_ADDR", "").strip()
    servers = tuple(s.strip() for s in env.get("NATS_URL", "nats://127.0.0.1:4222").split(","))
    return Config(
        service=service,
        server=ServerConfig(
            host=env.get("SOMA_HOST", "127.0.0.1"),
            port=_int(env, "SOMA_PORT", DEFAULT_PORTS.get(service, 0)),
            replica=env.get("SOMA_REPLICA", f"{service}-0"),
            grace_seconds=_float(env, "SOMA_GRACE_SECONDS", 10.0),
            drain_delay_seconds=_float(env, "SOMA_DRAIN_DELAY_SECONDS", 3.0),
            max_message_bytes=_int(env, "SOMA_MAX_MESSAGE_MB", 4, minimum=1) * 1024 * 1024,
            metrics_port=_int(env, "SOMA_METRICS_PORT", 0),
        ),
        log=LogConfig(level=level, json=log_format == "json"),
        database=DatabaseConfig(database_url, _int(env, "SOMA_DB_POOL_MAX", 10, minimum=1))
        if database_url
        else None,
        nats=NatsConfig(servers=tuple(s for s in servers if s)),
        vault=VaultConfig(vault_addr, env.get("VAULT_TOKEN", "")) if vault_addr else None,
        data_dir=Path(env.get("SOMA_DATA_DIR", ".soma")),
        partitions=_int(env, "SOMA_PARTITIONS", 4, minimum=1),
    )


def require_database(config: Config) -> DatabaseConfig:
    if config.database is None:
        raise ConfigError(f"{config.service} needs DATABASE_URL (a PostgreSQL URL)")
    return config.database
