"""Deny by default, through Envoy: every method of the contract, over gRPC and REST.

The method list comes from the descriptor set, so a method added to the contract is covered
without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.api import annotations_pb2, resource_pb2
from google.protobuf import descriptor_pool, symbol_database

from services.common.auth.public import is_public
from services.common.contract import SERVICES, load_contract
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gpb
from soma.keys.v1 import keys_pb2 as k
from soma.keys.v1 import keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as kpb
from tests.integration.harness import MeshRunner, http_request

pytestmark = pytest.mark.integration

ZERO = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Method:
    path: str  # /pkg.Service/Method
    request_type: str
    client_streaming: bool
    server_streaming: bool
    http: tuple[str, str] | None  # (verb, concrete path)

    def __str__(self) -> str:
        return self.path


def _concrete(template: str) -> str:
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        inner = path[start + 1 : end]
        pattern = inner.split("=", 1)[1] if "=" in inner else "x"
        path = path[:start] + pattern.replace("**", "x/y").replace("*", ZERO) + path[end + 1 :]
    return path


def contract_methods() -> list[Method]:
    load_contract()
    pool = descriptor_pool.Default()
    methods = []
    for full_name in SERVICES.values():
        for m in pool.FindServiceByName(full_name).methods:
            rule = m.GetOptions().Extensions[annotations_pb2.http]
            verb = rule.WhichOneof("pattern")
            http = (verb.upper(), _concrete(getattr(rule, verb))) if verb else None
            methods.append(
                Method(
                    f"/{full_name}/{m.name}",
                    m.input_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                    http,
                )
            )
    return methods


METHODS = contract_methods()
PROTECTED = [m for m in METHODS if not is_public(m.path)]


async def call(  # type: ignore[no-untyped-def]
    channel: grpc.aio.Channel, method: Method, metadata=(), request=None
) -> grpc.StatusCode:
    """Calls `method` (with an empty request unless one is given); returns the status code."""
    if request is None:
        request = symbol_database.Default().GetSymbol(method.request_type)()
    kw = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": lambda b: b,
    }
    try:
        if method.client_streaming:
            await channel.stream_unary(method.path, **kw)(iter([request]), metadata=metadata)
        elif method.server_streaming:
            async for _ in channel.unary_stream(method.path, **kw)(
                request, metadata=metadata, timeout=5
            ):
                break
        else:
            await channel.unary_unary(method.path, **kw)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_the_contract_has_public_and_protected_methods() -> None:
    public = {m.path for m in METHODS if is_public(m.path)}
    assert public == {
        "/soma.gateway.v1.GatewayService/GetHealth",
        "/soma.gateway.v1.GatewayService/GetVersion",
        "/soma.keys.v1.KeysService/IssueToken",
        "/soma.keys.v1.KeysService/GetJwks",
    }
    assert len(PROTECTED) == len(METHODS) - len(public) and len(PROTECTED) > 40


@pytest.mark.parametrize("method", PROTECTED, ids=str)
async def test_no_credentials_no_access_over_grpc(mesh: MeshRunner, method: Method) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        assert await call(channel, method) == grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Bearer soma_dev_aaaaaaaaaaaaaaaa_" + "a" * 33),)
        assert await call(channel, method, bad) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", [m for m in PROTECTED if m.http], ids=str)
def test_no_credentials_no_access_over_rest(mesh: MeshRunner, method: Method) -> None:
    assert method.http is not None
    verb, path = method.http
    body: object = {} if verb in {"POST", "PATCH", "PUT"} else None
    if method.client_streaming:
        body = [{}]  # the transcoder takes a client stream as a JSON array of messages
    resp = http_request(mesh.port, verb, path, body)
    assert resp.status == 401, (verb, path, resp.body[:200])
    error = resp.json()
    assert error["code"] == 16 and "credentials" in error["message"]
    assert resp.headers["x-api-version"] == "v1"


# -- tenant isolation over every method that names a resource ---------------------------------

READ_VERBS = ("Get", "List", "Stream", "Tail", "Export", "Verify")


def resource_targets(method: Method) -> list[tuple[list[str], str]]:
    """(field path, resource type) of each resource the request names: `name`, `parent`,
    `session` string fields, and the resource's own `name` inside an Update request."""
    pool = descriptor_pool.Default()
    request = pool.FindMessageTypeByName(method.request_type)
    verb = method.path.rsplit("/", 1)[1]
    targets = []
    for field in request.fields:
        if field.type == field.TYPE_STRING and field.name in ("name", "parent", "session"):
            ref = field.GetOptions().Extensions[resource_pb2.resource_reference].type
            targets.append(([field.name], ref))
        elif field.message_type is not None and verb.startswith("Update"):
            kind = field.message_type.GetOptions().Extensions[resource_pb2.resource].type
            if kind:
                targets.append(([field.name, "name"], kind))
    return targets


TARGETED = [m for m in PROTECTED if resource_targets(m)]


@pytest.fixture(scope="module")
async def tenant_a_resources(mesh: MeshRunner) -> dict[str, str]:
    """One real resource of tenant `default` per type the implemented services have."""
    md = (("authorization", f"Bearer {mesh.admin_key}"),)
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        keys = keys_pb2_grpc.KeysServiceStub(channel)
        session = await gw.CreateSession(
            g.CreateSessionRequest(session=gpb.Session(display_name="a")), metadata=md
        )
        key = await keys.CreateApiKey(
            k.CreateApiKeyRequest(api_key=kpb.ApiKey(display_name="a", roles=["member"])),
            metadata=md,
        )
        mesh.secrets.append(key.secret)
        bindings = await keys.ListRoleBindings(k.ListRoleBindingsRequest(), metadata=md)
    return {
        "gateway.soma.dev/Session": session.name,
        "keys.soma.dev/ApiKey": key.api_key.name,
        "keys.soma.dev/Tenant": "tenants/default",
        "keys.soma.dev/RoleBinding": bindings.role_bindings[0].name,
    }


@pytest.mark.parametrize("method", TARGETED, ids=str)
async def test_another_tenant_never_reaches_a_resource(  # type: ignore[no-untyped-def]
    mesh: MeshRunner, tenant_a_resources: dict[str, str], other_tenant_admin: str, method: Method
) -> None:
    request = symbol_database.Default().GetSymbol(method.request_type)()
    known = True
    for path, kind in resource_targets(method):
        target = request
        for part in path[:-1]:
            target = getattr(target, part)
        name = tenant_a_resources.get(kind)
        known = known and name is not None
        setattr(target, path[-1], name or f"x/{ZERO}")
    verb = method.path.rsplit("/", 1)[1]
    _make_valid(request, verb)
    got = await call_with(mesh, method, request, other_tenant_admin)
    if not known:  # audit/capsule resources: there is nothing of tenant A to reach
        assert got != grpc.StatusCode.OK, verb
    elif verb.startswith(READ_VERBS):
        assert got == grpc.StatusCode.NOT_FOUND, verb  # no existence leak
    else:
        assert got == grpc.StatusCode.PERMISSION_DENIED, verb


def _make_valid(request: Any, verb: str) -> None:
    """Fill what a well-formed call needs, so that the answer is about access, not shape."""
    if verb.startswith("Update") and hasattr(request, "update_mask"):
        request.update_mask.paths.append("display_name")
    if verb == "SendMessage":
        request.message.content = "from another tenant"


@pytest.fixture(scope="module")
def other_tenant_admin(mesh: MeshRunner) -> str:
    return mesh.create_key(tenant="tenant-b", roles=("admin",))


async def call_with(
    mesh: MeshRunner, method: Method, request: object, secret: str
) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        return await call(channel, method, (("authorization", f"Bearer {secret}"),), request)
