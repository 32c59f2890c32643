"""What runs where: the addresses of every part of one local mesh.

Built once by the supervisor (`soma-mesh up`) and handed to the Envoy renderer and the
process launcher, so that every port is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.contract import SERVICES

__all__ = ["API_VERSION", "SERVICES", "Endpoint", "Topology"]

API_VERSION = "v1"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    """Addresses of one mesh. `replicas[svc]` lists the gRPC endpoints of that service."""

    listener: Endpoint  # Envoy's public listener (gRPC, gRPC-Web, REST, OpenAPI)
    admin: Endpoint  # Envoy admin, loopback only
    replicas: dict[str, tuple[Endpoint, ...]]  # service short name -> replica endpoints
    descriptor_set: Path  # gen/soma.binpb
    openapi_document: Path  # gen/openapi/soma.openapi.json
    gateway_config_dir: Path  # gateway-config/
    run_dir: Path  # where rendered files (envoy.json, ...) are written
    api_version: str = API_VERSION
    extra: dict[str, str] = field(default_factory=dict)
    # Where Envoy sends its spans (OTEL_EXPORTER_OTLP_ENDPOINT); "" = Envoy does not trace.
    otlp_endpoint: str = ""
    trace_sample: float = 1.0  # share of requests Envoy starts a sampled trace for (0..1)
