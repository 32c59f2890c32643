"""The OpenAPI plugin (scripts/protoc_gen_openapi.py) on the real contract and on a synthetic one.

The real contract is built with buf into a descriptor set, fed to the plugin as a
CodeGeneratorRequest (as buf would), and the document is checked against the descriptors: every
http rule is an operation, descriptions are the proto comments, errors are google.rpc.Status.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.api import annotations_pb2, field_behavior_pb2, http_pb2, resource_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from openapi_spec_validator import validate

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "scripts" / "protoc_gen_openapi.py"
FDP = descriptor_pb2.FieldDescriptorProto


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


plugin = load_script("protoc_gen_openapi")


# --- the real contract ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    gen = load_script("gen")
    gen.sync_third_party(ROOT)
    out = tmp_path_factory.mktemp("buf") / "soma.binpb"
    gen.run(["buf", "build", "proto", "-o", str(out)], ROOT, "buf build")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def contract_files(
    fds: descriptor_pb2.FileDescriptorSet,
) -> list[descriptor_pb2.FileDescriptorProto]:
    return [f for f in fds.file if f.name.startswith("soma/")]


def run_plugin(fds: descriptor_pb2.FileDescriptorSet) -> plugin_pb2.CodeGeneratorResponse:
    request = plugin_pb2.CodeGeneratorRequest(
        file_to_generate=[f.name for f in contract_files(fds)], proto_file=fds.file
    )
    proc = subprocess.run(
        [sys.executable, str(PLUGIN)],
        input=request.SerializeToString(),
        capture_output=True,
        check=True,
    )
    return plugin_pb2.CodeGeneratorResponse.FromString(proc.stdout)


@pytest.fixture(scope="module")
def response(descriptor_set: descriptor_pb2.FileDescriptorSet) -> plugin_pb2.CodeGeneratorResponse:
    return run_plugin(descriptor_set)


@pytest.fixture(scope="module")
def document(response: plugin_pb2.CodeGeneratorResponse) -> dict[str, Any]:
    assert not response.error, response.error
    assert [f.name for f in response.file] == ["soma.openapi.json"]
    return json.loads(response.file[0].content)


def operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (path, verb, operation)."""
    return {
        op["operationId"]: (path, verb, op)
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }


def rule_bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str]]:
    out = []
    for r in [rule, *rule.additional_bindings]:
        kind = r.WhichOneof("pattern")
        out.append((kind, getattr(r, kind)) if kind != "custom" else (r.custom.kind, r.custom.path))
    return out


def shape(path: str) -> str:
    """`/v1/{name=sessions/*}:close`, `/v1/sessions/{session}:close` -> `/v1/sessions/*:close`."""
    path = re.sub(r"\{[^}=]+=([^}]+)\}", r"\1", path)
    return re.sub(r"\{[^}]+\}", "*", path)


def leading_comment(f: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    for loc in f.source_code_info.location:
        if list(loc.path) == path:
            return " ".join(loc.leading_comments.split())
    return ""


def test_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "Soma Mesh API"
    assert document["info"]["version"] == "v1"
    assert document["info"]["description"]
    assert document["servers"] == [
        {"url": "http://127.0.0.1:8080", "description": "The local mesh (`soma-mesh up`)."}
    ]


def test_every_http_rule_is_an_operation(
    descriptor_set: descriptor_pb2.FileDescriptorSet, document: dict[str, Any]
) -> None:
    ops = operations(document)
    expected = 0
    for f in contract_files(descriptor_set):
        for service in f.service:
            for method in service.method:
                assert method.options.HasExtension(annotations_pb2.http), method.name
                rule = method.options.Extensions[annotations_pb2.http]
                for n, (verb, template) in enumerate(rule_bindings(rule)):
                    op_id = f"{service.name}_{method.name}" + (f"_{n}" if n else "")
                    assert op_id in ops, f"{verb.upper()} {template} ({op_id}) is missing"
                    path, op_verb, op = ops[op_id]
                    assert (op_verb, shape(path)) == (verb, shape(template))
                    assert op["tags"] == [service.name]
                    expected += 1
    assert expected > 0
    assert len(ops) == expected + 2  # + /openapi.json and /v1/openapi.json
    for path in ("/openapi.json", "/v1/openapi.json"):
        assert document["paths"][path]["get"]["tags"] == ["Envoy"]


def test_path_parameters_are_whole_segments_and_unique(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        assert "=" not in path and "*" not in path, path
        names = re.findall(r"\{([^}]+)\}", path)
        assert len(names) == len(set(names)), path
        for op in item.values():
            in_path = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            assert sorted(in_path) == sorted(names), path
    ops = operations(document)
    assert ops["GatewayService_CloseSession"][0] == "/v1/sessions/{session}:close"
    assert ops["GatewayService_SendMessage"][0] == "/v1/sessions/{session}/messages"


def test_descriptions_come_from_comments(
    descriptor_set: descriptor_pb2.FileDescriptorSet, document: dict[str, Any]
) -> None:
    ops = operations(document)
    checked = 0
    for f in contract_files(descriptor_set):
        for s, service in enumerate(f.service):
            tag = next(t for t in document["tags"] if t["name"] == service.name)
            assert " ".join(tag["description"].split()) == leading_comment(f, [6, s])
            for m, method in enumerate(service.method):
                comment = leading_comment(f, [6, s, 2, m])
                op = ops[f"{service.name}_{method.name}"][2]
                assert " ".join(op["description"].split()) == comment
                assert comment.startswith(op["summary"])
                checked += 1
        for i, msg in enumerate(f.message_type):
            schema = document["components"]["schemas"].get(f"{f.package}.{msg.name}")
            if schema is None:
                continue  # request messages are spread over path, query and body
            for j, fld in enumerate(msg.field):
                doc = " ".join(schema["properties"][fld.name].get("description", "").split())
                assert doc.startswith(leading_comment(f, [4, i, 2, j])), (msg.name, fld.name)
                checked += 1
    assert checked > 20
    assert ops["GatewayService_GetSession"][2]["description"] == "Gets a session by name."


def test_errors_are_google_rpc_status(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    status = schemas["google.rpc.Status"]
    assert status["properties"]["code"]["type"] == "integer"
    assert status["properties"]["message"]["type"] == "string"
    details = status["properties"]["details"]
    assert details["type"] == "array"
    assert details["items"] == {"$ref": "#/components/schemas/google.protobuf.Any"}
    assert "@type" in schemas["google.protobuf.Any"]["properties"]
    error = document["components"]["responses"]["Error"]
    assert error["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }
    for op_id, (_, _, op) in operations(document).items():
        if not op_id.startswith("Envoy_"):
            assert op["responses"]["default"] == {"$ref": "#/components/responses/Error"}


def test_proto3_json_mapping(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    session = schemas["soma.gateway.v1.Session"]["properties"]
    assert list(session)[:3] == ["name", "tenant", "display_name"]  # proto names, field order
    assert session["message_count"]["type"] == "string"
    assert session["message_count"]["format"] == "int64"
    assert session["create_time"]["format"] == "date-time"
    assert session["labels"]["additionalProperties"] == {"type": "string"}
    assert session["name"]["readOnly"] is True
    assert "readOnly" not in session["display_name"]
    assert session["state"]["$ref"] == "#/components/schemas/soma.gateway.v1.SessionState"
    assert schemas["soma.gateway.v1.SessionState"]["enum"][1] == "SESSION_STATE_ACTIVE"
    assert schemas["soma.gateway.v1.Message"]["required"] == ["content"]
    assert "Oneof `kind`" in schemas["soma.gateway.v1.SessionEvent"]["description"]
    ops = operations(document)
    stream = ops["GatewayService_StreamSessionEvents"][2]["responses"]["200"]["content"]
    assert stream["application/x-ndjson"]["schema"]["$ref"].endswith("SessionEvent")
    create = ops["GatewayService_CreateSession"][2]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/soma.gateway.v1.Session"}
    assert [p["name"] for p in create["parameters"]] == ["request_id"]
    close = ops["GatewayService_CloseSession"][2]
    close_body = close["requestBody"]["content"]["application/json"]["schema"]
    assert list(close_body["properties"]) == ["request_id"]  # `name` is in the path


def test_output_is_deterministic(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    first = run_plugin(descriptor_set).file[0].content
    second = run_plugin(descriptor_set).file[0].content
    assert first == second
    assert first.endswith("}\n")


# --- a synthetic contract: what the real one does not use yet ---------------------------------


def add_field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    type_: int,
    type_name: str = "",
    *,
    repeated: bool = False,
    behavior: int | None = None,
) -> FDP:
    f = msg.field.add(name=name, number=len(msg.field) + 1, type=type_, type_name=type_name)
    f.label = FDP.LABEL_REPEATED if repeated else FDP.LABEL_OPTIONAL
    if behavior is not None:
        f.options.Extensions[field_behavior_pb2.field_behavior].append(behavior)
    return f


def synthetic_request() -> plugin_pb2.CodeGeneratorRequest:
    f = descriptor_pb2.FileDescriptorProto(name="test/v1/thing.proto", package="test.v1")
    thing = f.message_type.add(name="Thing")
    thing.options.Extensions[resource_pb2.resource].pattern.append("shelves/{shelf}/things/{thing}")
    add_field(thing, "name", FDP.TYPE_STRING, behavior=field_behavior_pb2.OUTPUT_ONLY)
    add_field(thing, "size", FDP.TYPE_UINT64, behavior=field_behavior_pb2.REQUIRED)
    add_field(thing, "blob", FDP.TYPE_BYTES)
    add_field(thing, "ttl", FDP.TYPE_MESSAGE, ".google.protobuf.Duration")
    add_field(thing, "extra", FDP.TYPE_MESSAGE, ".google.protobuf.Struct")
    add_field(thing, "tags", FDP.TYPE_STRING, repeated=True)
    entry = thing.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    add_field(entry, "key", FDP.TYPE_STRING)
    add_field(entry, "value", FDP.TYPE_INT64)
    add_field(thing, "counts", FDP.TYPE_MESSAGE, ".test.v1.Thing.CountsEntry", repeated=True)
    thing.oneof_decl.add(name="choice")
    add_field(thing, "a", FDP.TYPE_STRING).oneof_index = 0
    add_field(thing, "b", FDP.TYPE_INT32).oneof_index = 0

    get = f.message_type.add(name="GetThingRequest")
    add_field(get, "name", FDP.TYPE_STRING, behavior=field_behavior_pb2.REQUIRED)
    update = f.message_type.add(name="UpdateThingRequest")
    add_field(update, "thing", FDP.TYPE_MESSAGE, ".test.v1.Thing")
    add_field(update, "update_mask", FDP.TYPE_MESSAGE, ".google.protobuf.FieldMask")
    filt = f.message_type.add(name="Filter")
    add_field(filt, "kind", FDP.TYPE_STRING)
    add_field(filt, "again", FDP.TYPE_MESSAGE, ".test.v1.Filter")  # recursion must stop
    lst = f.message_type.add(name="ListThingsRequest")
    add_field(lst, "parent", FDP.TYPE_STRING)
    add_field(lst, "page_size", FDP.TYPE_INT32)
    add_field(lst, "filter", FDP.TYPE_MESSAGE, ".test.v1.Filter")

    service = f.service.add(name="ThingService")

    def method(name: str, req: str, resp: str, rule: http_pb2.HttpRule, stream: bool = False):
        m = service.method.add(
            name=name, input_type=f".test.v1.{req}", output_type=resp, server_streaming=stream
        )
        m.options.Extensions[annotations_pb2.http].CopyFrom(rule)

    get_rule = http_pb2.HttpRule(get="/v1/{name=shelves/*/things/*}")
    get_rule.additional_bindings.add(get="/v1/legacy/{name=**}")
    get_rule.additional_bindings.add(post="/v1/{name=shelves/*/things/*}:get", body="*")
    method("GetThing", "GetThingRequest", ".test.v1.Thing", get_rule)
    update_rule = http_pb2.HttpRule(patch="/v1/{thing.name=shelves/*/things/*}", body="thing")
    method("UpdateThing", "UpdateThingRequest", ".test.v1.Thing", update_rule)
    list_rule = http_pb2.HttpRule(get="/v1/{parent=shelves/*}/things")
    method("WatchThings", "ListThingsRequest", ".test.v1.Thing", list_rule, stream=True)
    delete_rule = http_pb2.HttpRule(delete="/v1/{name=shelves/*/things/*}")
    method("DeleteThing", "GetThingRequest", ".google.protobuf.Empty", delete_rule)

    f.source_code_info.location.add(path=[6, 0, 2, 0], leading_comments=" Gets a thing.\n More.\n")
    f.source_code_info.location.add(path=[4, 0, 2, 1], leading_comments=" Required. Size.\n")
    return plugin_pb2.CodeGeneratorRequest(file_to_generate=[f.name], proto_file=[f])


def test_synthetic_contract() -> None:
    doc = json.loads(plugin.render(plugin.build_document(synthetic_request())))
    validate(doc)
    ops = operations(doc)
    assert ops["ThingService_GetThing"][:2] == ("/v1/shelves/{shelf}/things/{thing}", "get")
    assert ops["ThingService_GetThing_1"][:2] == ("/v1/legacy/{name}", "get")
    assert ops["ThingService_GetThing_2"][:2] == ("/v1/shelves/{shelf}/things/{thing}:get", "post")
    get = ops["ThingService_GetThing"][2]
    assert get["summary"] == "Gets a thing."
    assert get["description"] == "Gets a thing.\nMore."
    assert "multi" not in get["parameters"][0]["description"]
    assert "contain `/`" in ops["ThingService_GetThing_1"][2]["parameters"][0]["description"]

    update = ops["ThingService_UpdateThing"][2]
    assert ops["ThingService_UpdateThing"][:2] == ("/v1/shelves/{shelf}/things/{thing}", "patch")
    assert [p["name"] for p in update["parameters"]] == ["shelf", "thing", "update_mask"]
    assert update["parameters"][2]["schema"]["type"] == "string"  # FieldMask
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/test.v1.Thing"}

    watch = ops["ThingService_WatchThings"][2]
    assert ops["ThingService_WatchThings"][0] == "/v1/shelves/{shelf}/things"
    assert [p["name"] for p in watch["parameters"]] == ["shelf", "page_size", "filter.kind"]
    assert "application/x-ndjson" in watch["responses"]["200"]["content"]
    delete = ops["ThingService_DeleteThing"][2]
    assert delete["responses"]["200"]["content"]["application/json"]["schema"] == {"type": "object"}

    thing = doc["components"]["schemas"]["test.v1.Thing"]
    props = thing["properties"]
    assert thing["required"] == ["size"]
    assert props["size"] == {"type": "string", "format": "uint64", "description": "Required. Size."}
    assert props["blob"] == {"type": "string", "format": "byte"}
    assert props["ttl"]["type"] == "string"
    assert props["extra"] == {"type": "object", "additionalProperties": True}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["counts"]["additionalProperties"] == {"type": "string", "format": "int64"}
    assert "Member of oneof `choice`" in props["a"]["description"]
    assert "test.v1.Thing.CountsEntry" not in doc["components"]["schemas"]


def test_a_path_bound_twice_is_an_error() -> None:
    request = synthetic_request()
    delete = request.proto_file[0].service[0].method[3]
    rule = delete.options.Extensions[annotations_pb2.http]
    rule.additional_bindings.add(delete="/v1/{name=shelves/*/things/*}")
    with pytest.raises(plugin.PluginError, match="bound twice"):
        plugin.build_document(request)


def test_template_conversion() -> None:
    index = plugin.Index(
        patterns={"shelves/*/things/*": ["shelf", "thing"]},
        parent_patterns={"shelves/*": ["shelf"]},
    )
    convert = plugin.convert_template
    assert (
        convert("/v1/{name=shelves/*/things/*}:x", index).path
        == "/v1/shelves/{shelf}/things/{thing}:x"
    )
    assert convert("/v1/{id}/parts", index).path == "/v1/{id}/parts"
    # no resource pattern: singular of the literal before the wildcard
    assert convert("/v1/{name=policies/*}", index).path == "/v1/policies/{policy}"
    # a parent of a resource pattern takes the pattern's names
    assert convert("/v1/{parent=shelves/*}/things", index).path == "/v1/shelves/{shelf}/things"
    # the same names twice in one path get suffixes
    converted = convert("/v1/{a=keys/*}/{b=keys/*}", index)
    assert converted.path == "/v1/keys/{key}/keys/{key_2}"
    assert [p.field_path for p in converted.params] == ["a", "b"]
    with pytest.raises(plugin.PluginError):
        convert("v1/things", index)
    with pytest.raises(plugin.PluginError):
        convert("/v1/*/things", index)
