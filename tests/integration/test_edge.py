"""What Envoy serves itself: OpenAPI, X-API-Version everywhere, health checks, admin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from tests.integration.harness import MeshRunner, http_request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def http_rules() -> set[tuple[str, str]]:
    """(verb, path template) of every google.api.http rule in the descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gen/soma.binpb").read_bytes())
    rules = set()
    for file in fds.file:
        if not file.package.startswith("soma."):
            continue
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                for r in [rule, *rule.additional_bindings]:
                    verb = r.WhichOneof("pattern")
                    if verb and verb != "custom":
                        rules.add((verb, getattr(r, verb)))
    return rules


@pytest.mark.parametrize("path", ["/openapi.json", "/v1/openapi.json"])
def test_openapi_document_served_with_caching(mesh: MeshRunner, path: str) -> None:
    resp = http_request(mesh.port, "GET", path)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert "max-age" in resp.headers.get("cache-control", "")
    assert resp.headers.get("etag")
    assert resp.headers["x-api-version"] == "v1"
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    from openapi_spec_validator import validate

    validate(doc)
    verbs = {
        (verb, p)
        for p, ops in doc["paths"].items()
        for verb in ops
        if verb in {"get", "post", "put", "patch", "delete"}
    }
    assert len(verbs) >= len(http_rules())
    for p in ("/v1/sessions", "/v1/health", "/v1/queue/stats"):
        assert p in doc["paths"], p
    assert doc == json.loads((ROOT / "gen/openapi/soma.openapi.json").read_text())
    again = http_request(mesh.port, "GET", path, headers={"if-none-match": resp.headers["etag"]})
    assert again.status in (200, 304)


def test_every_http_rule_has_a_route(mesh: MeshRunner) -> None:
    # No rule may be unknown to Envoy: each answers something other than Envoy's 404 for an
    # unknown method (the transcoder knows it; the service may say 400/404/501 itself).
    for verb, template in sorted(http_rules()):
        if template.endswith(":tail"):
            continue  # a live tail never ends by design (covered by the audit tests)
        path = template
        while "{" in path:
            start, end = path.index("{"), path.index("}")
            inner = path[start + 1 : end]
            pattern = inner.split("=", 1)[1] if "=" in inner else "x"
            path = (
                path[:start]
                + pattern.replace("**", "x/y").replace("*", "00000000-0000-0000-0000-000000000000")
                + path[end + 1 :]
            )
        resp = http_request(
            mesh.port,
            verb.upper(),
            path,
            {} if verb in {"post", "patch", "put"} else None,
            headers={"x-api-key": mesh.admin_key},
        )
        assert resp.headers["x-api-version"] == "v1", (verb, path)
        if resp.status == 404:
            assert resp.json()["code"] == 5 and resp.json()["message"], (
                verb,
                path,
                resp.body,
            )


def test_envoy_admin_sees_healthy_replicas(mesh: MeshRunner) -> None:
    resp = http_request(mesh.admin_port, "GET", "/clusters?format=json")
    assert resp.status == 200
    clusters = {c["name"]: c for c in resp.json()["cluster_statuses"]}
    for service in ("gateway", "keys", "audit", "capsule"):
        hosts = clusters[service]["host_statuses"]
        assert len(hosts) == mesh.replicas, service
        for host in hosts:
            assert host["health_status"]["eds_health_status"] == "HEALTHY", (service, host)
            assert not host["health_status"].get("failed_active_health_check"), (service, host)
    assert http_request(mesh.admin_port, "GET", "/ready").status == 200


async def test_reflection_through_envoy_resolves_method_symbols(channel) -> None:  # type: ignore[no-untyped-def]
    """What ghz does without --protoset: ask reflection, through Envoy, for the method symbol."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    expected = {  # symbol asked -> the service its file must define
        "soma.gateway.v1.GatewayService.GetSession": "GatewayService",
        "soma.keys.v1.KeysService.GetApiKey": "KeysService",
        "soma.capsule.v1.CapsuleService": "CapsuleService",
        "grpc.health.v1.Health.Check": "Health",
    }
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in expected]
    answers = [a async for a in stub.ServerReflectionInfo(iter(requests))]
    assert len(answers) == len(expected)
    for (symbol, service), answer in zip(expected.items(), answers, strict=True):
        assert answer.HasField("file_descriptor_response"), (symbol, answer.error_response)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        assert any(service in [s.name for s in f.service] for f in files), symbol
