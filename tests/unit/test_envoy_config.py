"""The Envoy bootstrap renderer: gateway-config parsing, contract reading, config shape, and
`envoy --mode validate` on the result. Behaviour under traffic is in
tests/integration/test_envoy_config.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.mesh.envoy_config import (
    LOCAL_REPLY_CODES,
    GatewayConfigError,
    describe_services,
    load_gateway_config,
    parse_duration,
    render_envoy_config,
    write_envoy_config,
)
from services.mesh.topology import SERVICES, Endpoint, Topology

REPO = Path(__file__).resolve().parents[2]
DESCRIPTORS = REPO / "gen" / "soma.binpb"
ENVOY = shutil.which("envoy") or str(REPO / ".venv" / "bin" / "envoy")


def fake_descriptor_set(path: Path) -> Path:
    """The real set plus a Fake service: a unary read, a POST, a server stream, a bare method."""
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(DESCRIPTORS.read_bytes())
    file = fds.file.add(name="soma/fake/v1/fake.proto", package="soma.fake.v1", syntax="proto3")
    file.message_type.add(name="Req")
    svc = file.service.add(name="FakeService")
    for name, stream, verb, rest in (
        ("GetAuditEvent", False, "get", "/v1/{name=events/*}"),
        ("VerifyChain", False, "post", "/v1/chain:verify"),  # a POST read-ish: not retried
        ("TailAuditEvents", True, "get", "/v1/events:tail"),
        ("FetchThing", False, None, None),  # no http rule, not Get/List: not retried
    ):
        method = svc.method.add(
            name=name,
            input_type=".soma.fake.v1.Req",
            output_type=".soma.fake.v1.Req",
            server_streaming=stream,
        )
        if verb:
            setattr(method.options.Extensions[annotations_pb2.http], verb, rest)
    path.write_bytes(fds.SerializeToString())
    return path


def topology(tmp_path: Path, descriptor_set: Path = DESCRIPTORS, **kw: Any) -> Topology:
    openapi = tmp_path / "openapi.json"
    openapi.write_text('{"openapi": "3.1.0"}')
    defaults: dict[str, Any] = {
        "listener": Endpoint("127.0.0.1", 18080),
        "admin": Endpoint("127.0.0.1", 19901),
        "replicas": {
            "gateway": (Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50052)),
            "keys": (Endpoint("127.0.0.1", 50061),),
        },
        "descriptor_set": descriptor_set,
        "openapi_document": openapi,
        "gateway_config_dir": REPO / "gateway-config",
        "run_dir": tmp_path / "run",
    }
    return Topology(**(defaults | kw))


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    return hcm(config)["route_config"]["virtual_hosts"][0]["routes"]


def first_route(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The route Envoy would pick for `path` (path, prefix and regex matchers only)."""
    for route in routes(config):
        match = route["match"]
        if "headers" in match:
            continue
        if (
            match.get("path") == path
            or ("prefix" in match and path.startswith(match["prefix"]))
            or ("safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path))
        ):
            return route
    raise AssertionError(f"no route for {path}")


# --------------------------------------------------------------------------- gateway-config


def test_repo_gateway_config_loads() -> None:
    cfg = load_gateway_config(REPO / "gateway-config")
    aliases = {a.matched: a.rewrite for a in cfg.routes.legacy_aliases}
    assert aliases["/keys"] == "/v1/keys" and aliases["/health"] == "/v1/health"
    assert aliases["/.well-known/jwks.json"] == "/v1/jwks"
    assert cfg.limits.request_timeout_s == 15 and cfg.limits.max_request_body_bytes == 1 << 20
    assert "x-api-version" in cfg.cors.expose_headers and "x-grpc-web" in cfg.cors.allow_headers


def test_missing_gateway_config_means_defaults(tmp_path: Path) -> None:
    cfg = load_gateway_config(tmp_path)
    assert cfg.routes.legacy_aliases == () and cfg.limits.num_retries == 2


@pytest.mark.parametrize(
    ("file", "text", "error"),
    [
        ("limits.yaml", "timeouts: {requets: 5s}\n", "unknown keys"),
        ("limits.yaml", "timeouts: {request: fast}\n", "not a duration"),
        ("limits.yaml", "retries: {num_retries: -1}\n", "non-negative"),
        ("limits.yaml", "bogus: 1\n", "unknown keys"),
        ("routes.yaml", "legacy_aliases: [{prefix: /a}]\n", "exactly one"),
        ("routes.yaml", "legacy_aliases: [{prefix: /a, path: /b, rewrite: /c}]\n", "exactly one"),
        ("routes.yaml", "legacy_aliases: [{prefix: /, rewrite: /v1}]\n", "below /"),
        ("routes.yaml", "legacy_aliases: [{prefix: /v1, rewrite: /v1/x}]\n", "loop"),
        ("cors.yaml", "allow_origin: [x]\n", "unknown keys"),
    ],
)
def test_bad_gateway_config_is_refused(tmp_path: Path, file: str, text: str, error: str) -> None:
    (tmp_path / file).write_text(text)
    with pytest.raises(GatewayConfigError, match=error):
        load_gateway_config(tmp_path)


def test_parse_duration() -> None:
    assert parse_duration("250ms", "x") == 0.25
    assert parse_duration("15s", "x") == 15
    assert parse_duration("5m", "x") == 300
    assert parse_duration(2, "x") == 2


# --------------------------------------------------------------------------- the contract


def test_describe_services_reads_the_descriptor_set() -> None:
    services = {s.full_name: s for s in describe_services(DESCRIPTORS)}
    gateway = services["soma.gateway.v1.GatewayService"]
    assert gateway.cluster == "gateway"
    methods = {m.name: m for m in gateway.methods}
    assert methods["StreamSessionEvents"].server_streaming
    assert not methods["StreamSessionEvents"].idempotent_read
    assert methods["GetSession"].idempotent_read and methods["ListSessions"].idempotent_read
    assert not methods["CreateSession"].idempotent_read
    assert methods["CreateSession"].http_verb == "post"
    for svc in services.values():  # every soma service found has its topology short name
        assert SERVICES.get(svc.cluster) == svc.full_name


def test_fake_service_is_picked_up(tmp_path: Path) -> None:
    services = {
        s.full_name: s for s in describe_services(fake_descriptor_set(tmp_path / "x.binpb"))
    }
    audit = {m.name: m for m in services["soma.fake.v1.FakeService"].methods}
    assert audit["GetAuditEvent"].idempotent_read
    assert not audit["VerifyChain"].idempotent_read
    assert not audit["FetchThing"].idempotent_read and audit["FetchThing"].http_verb is None
    assert audit["TailAuditEvents"].streaming


# --------------------------------------------------------------------------- rendering


def test_filter_order_and_transcoder_options(tmp_path: Path) -> None:
    config = render_envoy_config(topology(tmp_path))
    filters = hcm(config)["http_filters"]
    names = [f["name"] for f in filters]
    core = [n for n in names if n.startswith("envoy.")]
    assert core == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert names.index("soma.api_version") == 0  # sees every response, local replies included
    transcoder = filters[names.index("envoy.filters.http.grpc_json_transcoder")]["typed_config"]
    assert transcoder["services"] == [s.full_name for s in describe_services(DESCRIPTORS)]
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": True,
        "stream_newline_delimited": True,
    }
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": True,
        "reject_unknown_query_parameters": True,
    }
    assert transcoder["max_request_body_size"] == 1 << 20
    assert hcm(config)["codec_type"] == "AUTO"


def test_routes_by_service_prefix_streams_and_reads(tmp_path: Path) -> None:
    config = render_envoy_config(topology(tmp_path, fake_descriptor_set(tmp_path / "x.binpb")))
    gw = "/soma.gateway.v1.GatewayService"
    stream = first_route(config, f"{gw}/StreamSessionEvents")["route"]
    assert stream["timeout"] == "0s"
    safe = "connect-failure,refused-stream,reset-before-request"
    assert stream["retry_policy"]["retry_on"] == safe  # never reached a replica: safe to retry
    assert "per_try_timeout" not in stream["retry_policy"]  # a stream must not be cut
    read = first_route(config, f"{gw}/GetSession")["route"]
    assert read["timeout"] == "15s"
    assert read["retry_policy"]["retry_on"] == "unavailable,cancelled,reset,connect-failure"
    write = first_route(config, f"{gw}/CreateSession")["route"]
    assert write["timeout"] == "15s"
    assert write["retry_policy"]["retry_on"] == safe  # mutations: only never-delivered retries
    audit = "/soma.fake.v1.FakeService"
    assert first_route(config, f"{audit}/TailAuditEvents")["route"]["timeout"] == "0s"
    assert "retry_policy" in first_route(config, f"{audit}/GetAuditEvent")["route"]
    assert first_route(config, f"{audit}/VerifyChain")["route"]["retry_policy"]["retry_on"] == safe
    assert first_route(config, "/grpc.health.v1.Health/Check")["route"]["cluster"] == "gateway"
    assert first_route(config, "/grpc.health.v1.Health/Watch")["route"]["timeout"] == "0s"
    assert first_route(config, "/grpc.reflection.v1.ServerReflection/X")["route"]["timeout"] == "0s"
    assert first_route(config, "/soma.keys.v1.KeysService/GetKey")["route"]["cluster"] == "keys"
    # a gRPC call to an unknown service ends on the catch-all: a 404 local reply (UNIMPLEMENTED)
    catch_all = first_route(config, "/other.v1.X/Y")["route"]
    assert catch_all["cluster_not_found_response_code"] == "NOT_FOUND"


def test_clusters(tmp_path: Path) -> None:
    config = render_envoy_config(topology(tmp_path, fake_descriptor_set(tmp_path / "x.binpb")))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    # every service of the contract and of the topology, plus Envoy itself for the aliases
    assert {"gateway", "keys", "fake", "self"} <= set(clusters)
    gateway = clusters["gateway"]
    assert gateway["lb_policy"] == "ROUND_ROBIN"
    hosts = gateway["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [h["endpoint"]["address"]["socket_address"]["port_value"] for h in hosts] == [
        50051,
        50052,
    ]
    options = gateway["typed_extension_protocol_options"]
    assert "http2_protocol_options" in json.dumps(options)
    check = gateway["health_checks"][0]
    assert check["grpc_health_check"] == {"service_name": "soma.gateway.v1.GatewayService"}
    assert check["no_traffic_interval"] == "1s"
    assert gateway["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert gateway["outlier_detection"]["consecutive_gateway_failure"] == 3
    assert gateway["outlier_detection"]["enforcing_consecutive_gateway_failure"] == 100
    assert gateway["circuit_breakers"]["thresholds"][0]["max_requests"] == 4096
    # a service in the contract without replicas: an empty, still health-checked cluster
    assert clusters["fake"]["load_assignment"]["endpoints"][0]["lb_endpoints"] == []
    assert "health_checks" not in clusters["self"]


def test_legacy_alias_routes(tmp_path: Path) -> None:
    config = render_envoy_config(topology(tmp_path))
    for path, rewritten in [
        ("/keys", "/v1/keys"),
        ("/keys/k1", "/v1/keys/k1"),
        ("/keys/k1:revoke", "/v1/keys/k1:revoke"),
        ("/keys:search", "/v1/keys:search"),
        ("/capsules/c/versions", "/v1/capsules/c/versions"),
        ("/sessions", "/v1/sessions"),
        ("/health", "/v1/health"),
        ("/.well-known/jwks.json", "/v1/jwks"),
    ]:
        route = first_route(config, path)
        assert route["route"]["cluster"] == "self", path
        rewrite = route["route"]["regex_rewrite"]
        assert re.sub(rewrite["pattern"]["regex"], rewrite["substitution"], path) == rewritten
        assert route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"] == {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        }
    for path in ("/keysfoo", "/healthz", "/health/x", "/v1/keys", "/sessionsx"):
        assert first_route(config, path)["route"].get("cluster") != "self", path


def test_openapi_routes(tmp_path: Path) -> None:
    topo = topology(tmp_path)
    config = render_envoy_config(topo)
    served = [r for r in routes(config) if r["match"].get("path") == "/openapi.json"]
    not_modified, document = served
    assert not_modified["direct_response"] == {"status": 304}
    assert document["direct_response"]["body"] == {"filename": str(topo.openapi_document)}
    headers = {
        h["header"]["key"]: h["header"]["value"] for h in document["response_headers_to_add"]
    }
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=300"
    assert not_modified["match"]["headers"][0]["string_match"]["contains"] == headers["etag"]
    assert "envoy.filters.http.grpc_json_transcoder" in document["typed_per_filter_config"]
    assert any(r["match"].get("path") == "/v1/openapi.json" for r in routes(config))
    # the ETag follows the content
    topo.openapi_document.write_text('{"openapi": "3.1.1"}')
    again = render_envoy_config(topo)
    etag2 = [r for r in routes(again) if r["match"].get("path") == "/openapi.json"][1]
    assert etag2["response_headers_to_add"] != document["response_headers_to_add"]


def test_local_replies_are_json_for_rest_only(tmp_path: Path) -> None:
    mappers = hcm(render_envoy_config(topology(tmp_path)))["local_reply_config"]["mappers"]
    assert "body_format" not in hcm(render_envoy_config(topology(tmp_path)))["local_reply_config"]
    by_status = {}
    for mapper in mappers:
        rest_only, status = mapper["filter"]["and_filter"]["filters"]
        assert rest_only == {
            "header_filter": {"header": {"name": "x-soma-rest", "present_match": True}}
        }
        comparison = status["status_code_filter"]["comparison"]
        if comparison["op"] == "EQ":
            by_status[comparison["value"]["default_value"]] = mapper["body_format_override"]
    assert {k: v["json_format"]["code"] for k, v in by_status.items()} == LOCAL_REPLY_CODES
    assert by_status[404]["json_format"] == {
        "code": 5,
        "message": "%LOCAL_REPLY_BODY%",
        "details": [],
    }
    assert LOCAL_REPLY_CODES[400] == 3 and LOCAL_REPLY_CODES[413] == 8
    assert LOCAL_REPLY_CODES[503] == 14 and LOCAL_REPLY_CODES[504] == 4


def test_admin_must_be_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        render_envoy_config(topology(tmp_path, admin=Endpoint("0.0.0.0", 9901)))


def test_hostname_replicas_use_dns(tmp_path: Path) -> None:
    topo = topology(tmp_path, replicas={"gateway": (Endpoint("localhost", 50051),)})
    clusters = {c["name"]: c for c in render_envoy_config(topo)["static_resources"]["clusters"]}
    assert clusters["gateway"]["type"] == "STRICT_DNS" and clusters["self"]["type"] == "STATIC"


def test_envoy_validates_the_rendered_config(tmp_path: Path) -> None:
    topo = topology(tmp_path, fake_descriptor_set(tmp_path / "x.binpb"))
    path = write_envoy_config(topo)
    assert path == topo.run_dir / "envoy.json"
    json.loads(path.read_text())
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_envoy_validates_without_openapi_document(tmp_path: Path) -> None:
    topo = topology(tmp_path, openapi_document=tmp_path / "missing.json")
    path = write_envoy_config(topo)
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
