"""Render the Envoy bootstrap of the front door from a Topology and gateway-config/*.yaml.

Envoy is the single public entry: one listener serves gRPC, gRPC-Web and REST/JSON (transcoded
from the descriptor set), the OpenAPI document and the legacy unversioned aliases. Everything
that depends on the contract (services, streaming methods, read methods) is read from the
descriptor set, so a new service or method needs no change here. See envoy/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.common.tracing import ENVOY_SERVICE_NAME, TraceSettings
from services.mesh.topology import SERVICES, Endpoint, Topology

log = logging.getLogger(__name__)

__all__ = [
    "CorsConfig",
    "GatewayConfig",
    "LegacyAlias",
    "LimitsConfig",
    "MethodInfo",
    "RoutesConfig",
    "ServiceInfo",
    "describe_services",
    "load_gateway_config",
    "render_envoy_config",
    "write_envoy_config",
]

SELF_CLUSTER = "self"  # Envoy's own listener, for the legacy-alias second hop
TRACE_COLLECTOR_CLUSTER = "otlp_collector"
API_VERSION_HEADER = "x-api-version"
# Set by Envoy on requests that arrived as REST/JSON (not gRPC, not gRPC-Web); a client's own
# value is dropped first. Local-reply JSON mapping keys on it because the transcoder rewrites
# content-type to application/grpc before most local replies happen.
REST_MARKER_HEADER = "x-soma-rest"
NO_CLUSTER_HEADER = "x-soma-no-cluster"  # always removed: the catch-all route finds no cluster
_TYPE = "type.googleapis.com/"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
_ROUTE_FILTER_DISABLED = {"@type": _TYPE + "envoy.config.route.v3.FilterConfig", "disabled": True}

# Envoy local replies (its own 4xx/5xx) -> google.rpc.Code for the JSON body REST callers get.
# 413 is RESOURCE_EXHAUSTED, as gRPC itself reports an oversized message.
LOCAL_REPLY_CODES: dict[int, int] = {
    400: 3,  # INVALID_ARGUMENT: unknown query parameter, malformed JSON
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND: no such path / method
    408: 4,  # DEADLINE_EXCEEDED: request headers/body too slow
    413: 8,  # RESOURCE_EXHAUSTED: body larger than rest.max_request_body_bytes
    429: 8,  # RESOURCE_EXHAUSTED
    431: 8,  # RESOURCE_EXHAUSTED: headers too large
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE: no healthy upstream, circuit breaker open, connect failure
    504: 4,  # DEADLINE_EXCEEDED: route timeout
}
_OTHER_CLIENT_ERROR, _OTHER_SERVER_ERROR = 3, 13  # any other 4xx / 5xx

ACCESS_LOG_FORMAT = (
    "[%START_TIME%] %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
    '"%REQ(X-ENVOY-ORIGINAL-METHOD?:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% grpc=%GRPC_STATUS_NUMBER% %RESPONSE_FLAGS% %BYTES_RECEIVED%>%BYTES_SENT% "
    "%DURATION%ms %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %REQ(X-REQUEST-ID)%\n"
)


# --------------------------------------------------------------------------- gateway-config


@dataclass(frozen=True)
class LegacyAlias:
    """`prefix` (path and anything below it) or exact `path`, rewritten to `rewrite`."""

    rewrite: str
    prefix: str | None = None
    path: str | None = None

    @property
    def regex(self) -> str:
        if self.prefix is not None:
            # `/keys`, `/keys/...`, `/keys:verb`; never `/keysfoo`.
            return "^" + re.escape(self.prefix.rstrip("/")) + "([/:].*)?$"
        assert self.path is not None
        return "^" + re.escape(self.path) + "$"

    @property
    def matched(self) -> str:
        return self.prefix.rstrip("/") if self.prefix is not None else str(self.path)


@dataclass(frozen=True)
class RoutesConfig:
    legacy_aliases: tuple[LegacyAlias, ...] = ()
    openapi_paths: tuple[str, ...] = ("/openapi.json", "/v1/openapi.json")
    openapi_cache_control: str = "public, max-age=300"


@dataclass(frozen=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()
    allow_origin_regexes: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age_seconds: int = 600
    allow_headers: tuple[str, ...] = ("content-type", "x-grpc-web", "x-user-agent", "grpc-timeout")
    expose_headers: tuple[str, ...] = ("grpc-status", "grpc-message", API_VERSION_HEADER)


@dataclass(frozen=True)
class LimitsConfig:
    request_timeout_s: float = 15.0
    stream_idle_timeout_s: float = 300.0
    request_headers_timeout_s: float = 10.0
    connect_timeout_s: float = 1.0
    max_request_body_bytes: int = 1 << 20
    retry_on: str = "unavailable,cancelled,reset,connect-failure"
    # Conditions where the request provably never reached a replica's handler, so even a
    # mutation may go to another replica (e.g. one that is draining closed its listener).
    safe_retry_on: str = "connect-failure,refused-stream,reset-before-request"
    num_retries: int = 2
    per_try_timeout_s: float = 5.0
    hc_interval_s: float = 1.0
    hc_no_traffic_interval_s: float = 1.0
    hc_timeout_s: float = 1.0
    hc_unhealthy_threshold: int = 2
    hc_healthy_threshold: int = 1
    od_consecutive_5xx: int = 5
    od_consecutive_gateway_failure: int = 3
    od_interval_s: float = 5.0
    od_base_ejection_time_s: float = 15.0
    od_max_ejection_percent: int = 50
    cb_max_connections: int = 1024
    cb_max_pending_requests: int = 1024
    cb_max_requests: int = 4096
    cb_max_retries: int = 16
    max_downstream_connections: int = 20000


@dataclass(frozen=True)
class GatewayConfig:
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


class GatewayConfigError(ValueError):
    """A gateway-config file is malformed (unknown key, bad duration, bad alias)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, where: str) -> float:
    """`"250ms"`, `"15s"`, `"5m"` (or a bare number of seconds) -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise GatewayConfigError(f"{where}: {value!r} is not a duration like '15s' or '250ms'")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _section(data: Mapping[str, Any], key: str, where: str, allowed: set[str]) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise GatewayConfigError(f"{where}: {key} must be a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise GatewayConfigError(f"{where}: unknown keys in {key}: {sorted(unknown)}")
    return dict(value)


def _read_yaml(path: Path, allowed: set[str]) -> dict[str, Any]:
    if not path.exists():
        log.warning("%s is missing; using defaults", path)
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise GatewayConfigError(f"{path}: top level must be a mapping")
    unknown = set(data) - allowed
    if unknown:
        raise GatewayConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return dict(data)


def _load_routes(path: Path) -> RoutesConfig:
    data = _read_yaml(path, {"legacy_aliases", "openapi"})
    aliases = []
    for i, item in enumerate(data.get("legacy_aliases") or []):
        where = f"{path}: legacy_aliases[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"prefix", "path", "rewrite"}:
            raise GatewayConfigError(f"{where}: expected keys prefix|path and rewrite")
        if ("prefix" in item) == ("path" in item) or "rewrite" not in item:
            raise GatewayConfigError(f"{where}: give exactly one of prefix/path, and rewrite")
        alias = LegacyAlias(
            rewrite=str(item["rewrite"]), prefix=item.get("prefix"), path=item.get("path")
        )
        for value in (alias.rewrite, alias.matched):
            if not value.startswith("/") or value == "/":
                raise GatewayConfigError(f"{where}: {value!r} must be an absolute path below /")
        aliases.append(alias)
    rewrites = [a.rewrite for a in aliases]
    for alias in aliases:
        if any(re.match(alias.regex, r.split("?")[0]) for r in rewrites):
            raise GatewayConfigError(f"{path}: alias {alias.matched} matches a rewrite: a loop")
    openapi = _section(data, "openapi", str(path), {"paths", "cache_control"})
    defaults = RoutesConfig()
    return RoutesConfig(
        legacy_aliases=tuple(aliases),
        openapi_paths=tuple(openapi.get("paths") or defaults.openapi_paths),
        openapi_cache_control=str(openapi.get("cache_control", defaults.openapi_cache_control)),
    )


def _load_cors(path: Path) -> CorsConfig:
    keys = set(CorsConfig.__dataclass_fields__)
    data = _read_yaml(path, keys)
    defaults = CorsConfig()
    merged: dict[str, Any] = {}
    for key in keys:
        value = data.get(key, getattr(defaults, key))
        merged[key] = (
            tuple(str(v) for v in value or ()) if isinstance(value, list | tuple) else value
        )
    return CorsConfig(**merged)


_LIMIT_KEYS: dict[str, dict[str, str]] = {
    # yaml section -> yaml key -> LimitsConfig field (durations end in _s)
    "timeouts": {
        "request": "request_timeout_s",
        "stream_idle": "stream_idle_timeout_s",
        "request_headers": "request_headers_timeout_s",
        "connect": "connect_timeout_s",
    },
    "rest": {"max_request_body_bytes": "max_request_body_bytes"},
    "retries": {
        "retry_on": "retry_on",
        "safe_retry_on": "safe_retry_on",
        "num_retries": "num_retries",
        "per_try_timeout": "per_try_timeout_s",
    },
    "health_check": {
        "interval": "hc_interval_s",
        "no_traffic_interval": "hc_no_traffic_interval_s",
        "timeout": "hc_timeout_s",
        "unhealthy_threshold": "hc_unhealthy_threshold",
        "healthy_threshold": "hc_healthy_threshold",
    },
    "outlier_detection": {
        "consecutive_5xx": "od_consecutive_5xx",
        "consecutive_gateway_failure": "od_consecutive_gateway_failure",
        "interval": "od_interval_s",
        "base_ejection_time": "od_base_ejection_time_s",
        "max_ejection_percent": "od_max_ejection_percent",
    },
    "circuit_breakers": {
        "max_connections": "cb_max_connections",
        "max_pending_requests": "cb_max_pending_requests",
        "max_requests": "cb_max_requests",
        "max_retries": "cb_max_retries",
    },
}


def _load_limits(path: Path) -> LimitsConfig:
    data = _read_yaml(path, {*_LIMIT_KEYS, "max_downstream_connections"})
    values: dict[str, Any] = {}
    for section, keys in _LIMIT_KEYS.items():
        given = _section(data, section, str(path), set(keys))
        for key, attr in keys.items():
            raw = given.get(key)
            if raw is None:
                continue
            where = f"{path}: {section}.{key}"
            if attr.endswith("_s"):
                values[attr] = parse_duration(raw, where)
            elif attr in ("retry_on", "safe_retry_on"):
                values[attr] = str(raw)
            elif isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise GatewayConfigError(f"{where}: expected a non-negative integer")
            else:
                values[attr] = raw
    if "max_downstream_connections" in data:
        values["max_downstream_connections"] = int(data["max_downstream_connections"])
    return LimitsConfig(**values)


def load_gateway_config(directory: Path) -> GatewayConfig:
    """Read routes.yaml, cors.yaml and limits.yaml; a missing file means its defaults."""
    return GatewayConfig(
        routes=_load_routes(directory / "routes.yaml"),
        cors=_load_cors(directory / "cors.yaml"),
        limits=_load_limits(directory / "limits.yaml"),
    )


# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class MethodInfo:
    name: str
    client_streaming: bool
    server_streaming: bool
    http_verb: str | None  # "get", "post", ... from google.api.http; None without a rule

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming

    @property
    def idempotent_read(self) -> bool:
        """Safe to retry: a unary GET, or a unary Get*/List* method."""
        if self.streaming:
            return False
        return self.http_verb == "get" or self.name.startswith(("Get", "List"))


@dataclass(frozen=True)
class ServiceInfo:
    full_name: str  # soma.gateway.v1.GatewayService
    package: str  # soma.gateway.v1
    methods: tuple[MethodInfo, ...]

    @property
    def cluster(self) -> str:
        """Cluster (and topology) short name: the `<svc>` in `soma.<svc>.v1`."""
        return self.package.split(".")[1]

    def path(self, method: MethodInfo) -> str:
        return f"/{self.full_name}/{method.name}"


def describe_services(
    descriptor_set: Path, package_prefix: str = "soma."
) -> tuple[ServiceInfo, ...]:
    """Every service under `package_prefix` in a FileDescriptorSet, with its methods."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    services = []
    for file in fds.file:
        if not file.package.startswith(package_prefix):
            continue
        for svc in file.service:
            methods = []
            for m in svc.method:
                rule = m.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb == "custom":
                    verb = rule.custom.kind.lower()
                methods.append(MethodInfo(m.name, m.client_streaming, m.server_streaming, verb))
            services.append(ServiceInfo(f"{file.package}.{svc.name}", file.package, tuple(methods)))
    return tuple(sorted(services, key=lambda s: s.full_name))


# --------------------------------------------------------------------------- rendering


def _dur(seconds: float) -> str:
    return f"{seconds:g}s"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _TYPE + type_name, **fields}


def _socket(endpoint: Endpoint) -> dict[str, Any]:
    return {"socket_address": {"address": endpoint.host, "port_value": endpoint.port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def _cluster(
    name: str, endpoints: Sequence[Endpoint], limits: LimitsConfig, health_service: str | None
) -> dict[str, Any]:
    static = all(_is_ip(e.host) for e in endpoints)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _dur(limits.connect_timeout_s),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket(e)}} for e in endpoints]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
    }
    if health_service is None:
        return cluster
    cluster.update(
        {
            "health_checks": [
                {
                    "timeout": _dur(limits.hc_timeout_s),
                    "interval": _dur(limits.hc_interval_s),
                    "no_traffic_interval": _dur(limits.hc_no_traffic_interval_s),
                    "unhealthy_threshold": limits.hc_unhealthy_threshold,
                    "healthy_threshold": limits.hc_healthy_threshold,
                    "grpc_health_check": {"service_name": health_service},
                }
            ],
            # 0: never route to a replica the health checks call unhealthy (503 instead).
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            "outlier_detection": {
                "consecutive_5xx": limits.od_consecutive_5xx,
                "consecutive_gateway_failure": limits.od_consecutive_gateway_failure,
                "enforcing_consecutive_gateway_failure": 100,
                "interval": _dur(limits.od_interval_s),
                "base_ejection_time": _dur(limits.od_base_ejection_time_s),
                "max_ejection_percent": limits.od_max_ejection_percent,
                # Envoy's default, stated: a replica ejected for errors it answered (UNAVAILABLE
                # while a shared dependency is down) is back at its next passed health check,
                # not after base_ejection_time x ejections (gateway-config/limits.yaml).
                "successful_active_health_check_uneject_host": True,
            },
            "circuit_breakers": {
                "thresholds": [
                    {
                        "priority": "DEFAULT",
                        "max_connections": limits.cb_max_connections,
                        "max_pending_requests": limits.cb_max_pending_requests,
                        "max_requests": limits.cb_max_requests,
                        "max_retries": limits.cb_max_retries,
                        "track_remaining": True,
                    }
                ]
            },
        }
    )
    return cluster


def _tracing(topology: Topology, limits: LimitsConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HCM `tracing`, collector cluster): Envoy starts the trace of every request it samples
    (`random_sampling`) and passes `traceparent` upstream, so a service's span is its child."""
    host, port, tls = TraceSettings(
        topology.otlp_endpoint, topology.trace_sample
    ).collector_address()
    cluster = _cluster(TRACE_COLLECTOR_CLUSTER, [Endpoint(host, port)], limits, None)
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", sni=host
            ),
        }
    tracing = {
        "random_sampling": {"value": round(topology.trace_sample * 100.0, 4)},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={
                    "envoy_grpc": {"cluster_name": TRACE_COLLECTOR_CLUSTER},
                    "timeout": "1s",
                },
                service_name=ENVOY_SERVICE_NAME,
            ),
        },
    }
    return tracing, cluster


def _grpc_route(
    match: dict[str, Any], cluster: str, timeout_s: float, **extra: Any
) -> dict[str, Any]:
    # No max_stream_duration.grpc_timeout_header_max: with it, a gRPC call without a
    # grpc-timeout header gets no timeout at all. A client's shorter deadline is enforced by the
    # client and the replica (grpc-timeout is forwarded); 0 (streams) means none.
    route: dict[str, Any] = {"cluster": cluster, "timeout": _dur(timeout_s), **extra}
    return {"match": match, "route": route}


def _service_routes(svc: ServiceInfo, limits: LimitsConfig) -> list[dict[str, Any]]:
    """Exact-path routes for the methods that differ from the service's prefix route:
    streams (no timeout, no retries) and idempotent reads (retried). One route per method, as
    a regex alternation over many methods soon exceeds Envoy's RE2 program size limit."""
    routes = []
    for m in svc.methods:
        match = {"path": svc.path(m)}
        if m.streaming:
            routes.append(
                _grpc_route(match, svc.cluster, 0, retry_policy=_retry_policy(limits, safe=True))
            )
        elif m.idempotent_read:
            retry = _retry_policy(limits)
            routes.append(
                _grpc_route(match, svc.cluster, limits.request_timeout_s, retry_policy=retry)
            )
    return routes


def _retry_policy(limits: LimitsConfig, safe: bool = False) -> dict[str, Any]:
    # The safe policy has no per-try timeout: it also covers streams, which must not be cut.
    timeout = {} if safe else {"per_try_timeout": _dur(limits.per_try_timeout_s)}
    return {
        "retry_on": limits.safe_retry_on if safe else limits.retry_on,
        "num_retries": limits.num_retries,
        **timeout,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }


def _openapi_routes(
    topology: Topology, routes_cfg: RoutesConfig
) -> tuple[list[dict[str, Any]], int]:
    """Direct responses for the OpenAPI document (with ETag/304) and the body size they need."""
    doc = topology.openapi_document
    no_transcoder = {_TRANSCODER: _ROUTE_FILTER_DISABLED}
    routes: list[dict[str, Any]] = []
    if not doc.is_file():
        log.warning("OpenAPI document %s is missing; %s answer 404", doc, routes_cfg.openapi_paths)
        for path in routes_cfg.openapi_paths:
            routes.append(
                {
                    "match": {"path": path},
                    "direct_response": {
                        "status": 404,
                        "body": {"inline_string": "no OpenAPI document"},
                    },
                    "typed_per_filter_config": no_transcoder,
                }
            )
        return routes, 0
    content = doc.read_bytes()
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    cache = [
        {"header": {"key": "cache-control", "value": routes_cfg.openapi_cache_control}},
        {"header": {"key": "etag", "value": etag}},
        # A public document; direct responses get no CORS handling, so allow any origin here.
        {"header": {"key": "access-control-allow-origin", "value": "*"}},
    ]
    for path in routes_cfg.openapi_paths:
        routes.append(  # a revalidation with the current ETag: 304, no body
            {
                "match": {
                    "path": path,
                    "headers": [{"name": "if-none-match", "string_match": {"contains": etag}}],
                },
                "direct_response": {"status": 304},
                "response_headers_to_add": cache,
                "typed_per_filter_config": no_transcoder,
            }
        )
        routes.append(
            {
                "match": {"path": path},
                "direct_response": {"status": 200, "body": {"filename": str(doc.resolve())}},
                "response_headers_to_add": [
                    {"header": {"key": "content-type", "value": "application/json"}},
                    *cache,
                ],
                "typed_per_filter_config": no_transcoder,
            }
        )
    return routes, len(content)


def _alias_routes(routes_cfg: RoutesConfig) -> list[dict[str, Any]]:
    """Legacy paths go back into this listener, rewritten; the second hop transcodes them."""
    return [
        {
            "match": {"safe_regex": {"regex": alias.regex}},
            "route": {
                "cluster": SELF_CLUSTER,
                "regex_rewrite": {
                    "pattern": {"regex": "^" + re.escape(alias.matched)},
                    "substitution": alias.rewrite,
                },
                "timeout": "0s",  # the second hop enforces the real timeout
            },
            "typed_per_filter_config": {_TRANSCODER: _ROUTE_FILTER_DISABLED},
        }
        for alias in routes_cfg.legacy_aliases
    ]


def _catch_all_route() -> dict[str, Any]:
    """Last route: everything else.

    REST paths arrive here before transcoding (they are re-routed on their gRPC path after it),
    and the CORS filter only acts on a route with a route entry, so this must not be a
    direct_response. What reaches the router on it (a gRPC call to an unknown service) gets a
    404 local reply (UNIMPLEMENTED for gRPC): its cluster comes from a header that Envoy strips
    from every request, so the cluster is never found.
    """
    return {
        "match": {"prefix": "/"},
        "route": {
            "cluster_header": NO_CLUSTER_HEADER,
            "cluster_not_found_response_code": "NOT_FOUND",
        },
    }


def _cors_policy(cors: CorsConfig) -> dict[str, Any]:
    origins = [{"exact": o, "ignore_case": True} for o in cors.allow_origins]
    origins += [{"safe_regex": {"regex": r}} for r in cors.allow_origin_regexes]
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=origins,
        allow_methods="GET, POST, PUT, PATCH, DELETE, OPTIONS",
        allow_headers=", ".join(cors.allow_headers),
        expose_headers=", ".join(cors.expose_headers),
        max_age=str(cors.max_age_seconds),
        allow_credentials=cors.allow_credentials,
    )


def _local_reply_config() -> dict[str, Any]:
    """JSON google.rpc.Status bodies for Envoy's own error replies to REST callers.

    Scoped on the REST marker header: gRPC and gRPC-Web callers keep Envoy's gRPC local reply
    untouched (grpc-status/grpc-message). Envoy decides "gRPC or not" for a local reply from the
    request as it arrived, so a transcoded REST call gets an HTTP reply, mapped here.
    """
    not_grpc = {"header_filter": {"header": {"name": REST_MARKER_HEADER, "present_match": True}}}

    def status(op: str, value: int) -> dict[str, Any]:
        comparison = {
            "op": op,
            "value": {"default_value": value, "runtime_key": f"soma.lr_{value}"},
        }
        return {"status_code_filter": {"comparison": comparison}}

    def body(code: int) -> dict[str, Any]:
        return {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []}}

    mappers = [
        {
            "filter": {"and_filter": {"filters": [not_grpc, status("EQ", http)]}},
            "body_format_override": body(code),
        }
        for http, code in LOCAL_REPLY_CODES.items()
    ]
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [not_grpc, status("GE", 500)]}},
            "body_format_override": body(_OTHER_SERVER_ERROR),
        }
    )
    mappers.append(
        {
            "filter": {"and_filter": {"filters": [not_grpc, status("GE", 400)]}},
            "body_format_override": body(_OTHER_CLIENT_ERROR),
        }
    )
    return {"mappers": mappers}


def _skipped_for_grpc(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """`config` as a filter that is skipped when the request is gRPC or gRPC-Web."""
    return _typed(
        "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        extension_config={"name": name, "typed_config": config},
        xds_matcher={
            "matcher_list": {
                "matchers": [
                    {
                        "predicate": {
                            "single_predicate": {
                                "input": {
                                    "name": "content-type",
                                    "typed_config": _typed(
                                        "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                                        header_name="content-type",
                                    ),
                                },
                                "value_match": {"prefix": "application/grpc"},
                            }
                        },
                        "on_match": {
                            "action": {
                                "name": "skip",
                                "typed_config": _typed(
                                    "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
                                ),
                            }
                        },
                    }
                ]
            }
        },
    )


def _http_filters(
    topology: Topology, services: Sequence[ServiceInfo], cfg: GatewayConfig
) -> list[dict[str, Any]]:
    api_version = _typed(
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        mutations={
            "request_mutations": [{"remove": REST_MARKER_HEADER}, {"remove": NO_CLUSTER_HEADER}],
            "response_mutations": [
                {
                    "append": {
                        "header": {"key": API_VERSION_HEADER, "value": topology.api_version},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                }
            ],
        },
    )
    grpc_only = ("grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding")
    strip_grpc = [{"remove": h} for h in grpc_only]
    rest_only = _skipped_for_grpc(
        "soma.rest_only",
        _typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={
                "request_mutations": [
                    {
                        "append": {
                            "header": {"key": REST_MARKER_HEADER, "value": "1"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ],
                "response_mutations": strip_grpc,
            },
        ),
    )
    # The transcoder's own max_request_body_size only bounds what it buffers while converting
    # JSON incrementally, so a 2 MiB JSON body streamed through untouched. The buffer filter
    # bounds the whole REST body (413 -> JSON via local_reply_config); gRPC and gRPC-Web skip it,
    # so client-streaming uploads are not buffered or limited here.
    rest_body_limit = _skipped_for_grpc(
        "soma.rest_body_limit",
        _typed(
            "envoy.extensions.filters.http.buffer.v3.Buffer",
            max_request_bytes=cfg.limits.max_request_body_bytes,
        ),
    )
    transcoder = _typed(
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=str(topology.descriptor_set.resolve()),
        services=[s.full_name for s in services],
        print_options={
            "always_print_primitive_fields": True,
            "preserve_proto_field_names": True,
            "stream_newline_delimited": True,
        },
        convert_grpc_status=True,
        request_validation_options={
            "reject_unknown_method": True,
            "reject_unknown_query_parameters": True,
        },
        max_request_body_size=cfg.limits.max_request_body_bytes,
    )
    return [
        # Before everything else so that every response passes through it on the way out:
        # upstream replies, local replies of later filters, CORS preflights.
        {"name": "soma.api_version", "typed_config": api_version},
        {"name": "soma.rest_only", "typed_config": rest_only},
        {"name": "soma.rest_body_limit", "typed_config": rest_body_limit},
        {
            "name": "envoy.filters.http.cors",
            "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors"),
        },
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"),
        },
        {"name": _TRANSCODER, "typed_config": transcoder},
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
        },
    ]


def render_envoy_config(
    topology: Topology, gateway_config: GatewayConfig | None = None
) -> dict[str, Any]:
    """The Envoy v3 bootstrap for `topology`, as a JSON-ready dict."""
    if not _is_loopback(topology.admin.host):
        raise ValueError(f"Envoy admin must listen on loopback, not {topology.admin.host}")
    cfg = gateway_config or load_gateway_config(topology.gateway_config_dir)
    limits = cfg.limits
    services = describe_services(topology.descriptor_set)
    if not services:
        raise ValueError(f"no soma.* services in {topology.descriptor_set}")

    # Clusters: one per service short name, from the topology and from the contract (a service in
    # the contract without replicas gets an empty cluster: 503 / UNAVAILABLE, not a config error).
    health_names = {**SERVICES, **{s.cluster: s.full_name for s in services}}
    cluster_names = sorted({*topology.replicas, *(s.cluster for s in services)})
    clusters = [
        _cluster(name, topology.replicas.get(name, ()), limits, health_names.get(name, ""))
        for name in cluster_names
    ]
    self_host = (
        topology.listener.host if topology.listener.host not in ("0.0.0.0", "::") else "127.0.0.1"
    )
    clusters.append(
        _cluster(SELF_CLUSTER, [Endpoint(self_host, topology.listener.port)], limits, None)
    )

    openapi_routes, openapi_size = _openapi_routes(topology, cfg.routes)
    routes: list[dict[str, Any]] = [*openapi_routes, *_alias_routes(cfg.routes)]
    for svc in services:
        routes += _service_routes(svc, limits)
    if "gateway" in cluster_names:
        routes.append(_grpc_route({"path": "/grpc.health.v1.Health/Watch"}, "gateway", 0))
        routes.append(
            _grpc_route({"prefix": "/grpc.health.v1.Health/"}, "gateway", limits.request_timeout_s)
        )
        routes.append(_grpc_route({"prefix": "/grpc.reflection."}, "gateway", 0))
    for name in cluster_names:
        routes.append(
            _grpc_route(
                {"prefix": f"/soma.{name}.v1."},
                name,
                limits.request_timeout_s,
                retry_policy=_retry_policy(limits, safe=True),
            )
        )
    routes.append(_catch_all_route())

    hcm = _typed(
        _HCM,
        stat_prefix="ingress",
        codec_type="AUTO",
        use_remote_address=True,
        normalize_path=True,
        merge_slashes=True,
        stream_idle_timeout=_dur(limits.stream_idle_timeout_s),
        request_headers_timeout=_dur(limits.request_headers_timeout_s),
        access_log=[
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed(
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    log_format={"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                ),
            }
        ],
        local_reply_config=_local_reply_config(),
        route_config={
            "name": "soma",
            "max_direct_response_body_size_bytes": max(1 << 20, 2 * openapi_size),
            "virtual_hosts": [
                {
                    "name": "soma",
                    "domains": ["*"],
                    "routes": routes,
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(cfg.cors)},
                }
            ],
        },
        http_filters=_http_filters(topology, services, cfg),
    )
    if topology.otlp_endpoint:
        hcm["tracing"], collector = _tracing(topology, limits)
        clusters.append(collector)
    return {
        "node": {"id": "soma-edge", "cluster": "soma-mesh"},
        "admin": {
            "address": _socket(topology.admin),
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": _typed(
                        "envoy.extensions.access_loggers.file.v3.FileAccessLog", path="/dev/null"
                    ),
                }
            ],
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "public",
                    "address": _socket(topology.listener),
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
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=limits.max_downstream_connections,
                    ),
                }
            ]
        },
    }


def write_envoy_config(topology: Topology, gateway_config: GatewayConfig | None = None) -> Path:
    """Render and write `run_dir/envoy.json` (atomically); returns its path."""
    config = render_envoy_config(topology, gateway_config)
    topology.run_dir.mkdir(parents=True, exist_ok=True)
    path = topology.run_dir / "envoy.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    log.info("wrote Envoy bootstrap %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m services.mesh.envoy_config --replica gateway=127.0.0.1:50051 ...` prints a
    bootstrap (for reading or `envoy --mode validate`)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--listener", default="127.0.0.1:8080")
    parser.add_argument("--admin", default="127.0.0.1:9901")
    parser.add_argument("--replica", action="append", default=[], help="svc=host:port, repeatable")
    parser.add_argument("--descriptor-set", default="gen/soma.binpb", type=Path)
    parser.add_argument("--openapi", default="gen/openapi/soma.openapi.json", type=Path)
    parser.add_argument("--gateway-config", default="gateway-config", type=Path)
    args = parser.parse_args(argv)

    def endpoint(text: str) -> Endpoint:
        host, _, port = text.rpartition(":")
        return Endpoint(host, int(port))

    replicas: dict[str, list[Endpoint]] = {}
    for item in args.replica:
        svc, _, addr = item.partition("=")
        replicas.setdefault(svc, []).append(endpoint(addr))
    topology = Topology(
        listener=endpoint(args.listener),
        admin=endpoint(args.admin),
        replicas={k: tuple(v) for k, v in replicas.items()},
        descriptor_set=args.descriptor_set,
        openapi_document=args.openapi,
        gateway_config_dir=args.gateway_config,
        run_dir=Path("."),
    )
    print(json.dumps(render_envoy_config(topology), indent=2))


if __name__ == "__main__":
    main()
