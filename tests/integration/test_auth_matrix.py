"""Deny by default, through Envoy: every method of the contract, over gRPC and REST.

The method list comes from the descriptor set, so a method added to the contract is covered
without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pool, symbol_database

from services.common.auth.public import is_public
from services.common.contract import SERVICES, load_contract
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


async def call(channel: grpc.aio.Channel, method: Method, metadata=()) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Calls `method` with an empty request; returns the status code."""
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
