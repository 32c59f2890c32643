#!/usr/bin/env python3
"""buf local plugin: one OpenAPI 3.1 document (`soma.openapi.json`) for the whole contract.

buf hands us a CodeGeneratorRequest on stdin (strategy `all`: every file at once) and we answer
with a CodeGeneratorResponse holding a single file. Pure Python: protobuf and
googleapis-common-protos only.

What the document describes is what Envoy's gRPC-JSON transcoder serves on the public listener:
- one operation per `google.api.http` rule, `additional_bindings` included. operationId is
  `<Service>_<Method>`; an additional binding gets `<Service>_<Method>_<n>` (n = 1, 2, ...) so
  operationIds stay unique. Tags are service names; summary/description come from the leading
  proto comments (SourceCodeInfo).
- JSON follows the proto3 JSON mapping with the transcoder's `preserve_proto_field_names`:
  snake_case field names; int64/uint64 are strings; enums are strings; Timestamp is a date-time
  string, Duration and FieldMask strings; bytes base64; maps objects.
- server-streaming methods answer `application/x-ndjson`: one JSON message per line
  (`stream_newline_delimited`); the schema given is that of ONE line.
- every operation's `default` response is a `google.rpc.Status` JSON body
  (`convert_grpc_status`), and `/openapi.json` + `/v1/openapi.json` (served by Envoy itself from
  this file) are listed under the tag `Envoy`.

Path templates. OpenAPI path parameters must not contain `/`, but an http rule variable such as
`{name=sessions/*}` binds a multi-segment value (`sessions/abc`). So each wildcard of a variable
becomes its own path parameter, the literal segments stay in the path, and custom verbs stay as
they are:
    /v1/{name=sessions/*}:close            -> /v1/sessions/{session}:close
    /v1/{name=sessions/*/messages/*}       -> /v1/sessions/{session}/messages/{message}
    /v1/{id}                               -> /v1/{id}
The wildcard names come from the `google.api.resource` pattern with the same shape (for
`sessions/*`: `sessions/{session}`), else from the singular of the literal segment before the
wildcard, else `<field>_<n>`; a clash within one path gets a numeric suffix. Each such parameter's
description says which request field it fills. `**` is mapped the same way (its value may then
hold `/`, as the description says). Parameter names are therefore unique per path.

Output is deterministic: mapping keys are sorted, except `properties`, which keep the proto field
order; lists keep a defined order (path params in path order, then query params in field order).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.api import annotations_pb2, field_behavior_pb2, http_pb2, resource_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

OUTPUT_NAME = "soma.openapi.json"
OPENAPI_VERSION = "3.1.0"
TITLE = "Soma Mesh API"
SERVER_URL = "http://127.0.0.1:8080"
STATUS_SCHEMA = "google.rpc.Status"
ANY_SCHEMA = "google.protobuf.Any"
ENVOY_TAG = "Envoy"
NDJSON = "application/x-ndjson"
JSON = "application/json"

FDP = descriptor_pb2.FieldDescriptorProto
Json = dict[str, Any]

# SourceCodeInfo path numbers (field numbers in descriptor.proto).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE, SERVICE_METHOD = 2, 2

SCALARS: dict[int, Json] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (JavaScript numbers lose precision)
    FDP.TYPE_INT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SINT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FDP.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte"},
}

# Well-known types have their own JSON forms; they are inlined, never components.
WELL_KNOWN: dict[str, Json] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "A duration in seconds with an `s` suffix, e.g. `1.5s`.",
    },
    ".google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths, e.g. `display_name,labels`.",
    },
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    ".google.protobuf.Value": {"description": "Any JSON value."},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.NullValue": {"type": "null"},
    ".google.protobuf.Any": {"$ref": f"#/components/schemas/{ANY_SCHEMA}"},
    ".google.protobuf.DoubleValue": {"type": ["number", "null"], "format": "double"},
    ".google.protobuf.FloatValue": {"type": ["number", "null"], "format": "float"},
    ".google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
    ".google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
    ".google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    ".google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32"},
    ".google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    ".google.protobuf.StringValue": {"type": ["string", "null"]},
    ".google.protobuf.BytesValue": {"type": ["string", "null"], "format": "byte"},
}


class PluginError(Exception):
    """A problem in the contract that makes the document impossible; shown by buf."""


# ---------------------------------------------------------------------------------------------
# Indexes over the request: types by full name, comments by source path, resource patterns.


@dataclass(frozen=True)
class Located:
    """A message or enum with the file it lives in and its SourceCodeInfo path."""

    full_name: str  # with the leading dot, as in FieldDescriptorProto.type_name
    proto: descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto
    file: descriptor_pb2.FileDescriptorProto
    path: tuple[int, ...]


@dataclass
class Index:
    types: dict[str, Located] = field(default_factory=dict)
    comments: dict[tuple[str, tuple[int, ...]], str] = field(default_factory=dict)
    # resource pattern shape ("sessions/*") -> wildcard names (["session"])
    patterns: dict[str, list[str]] = field(default_factory=dict)
    # the same for every parent of a pattern ("shelves/*" of "shelves/{shelf}/things/{thing}")
    parent_patterns: dict[str, list[str]] = field(default_factory=dict)

    def wildcard_names(self, shape: str) -> list[str] | None:
        return self.patterns.get(shape) or self.parent_patterns.get(shape)

    def comment(self, file: descriptor_pb2.FileDescriptorProto, path: tuple[int, ...]) -> str:
        return self.comments.get((file.name, path), "")


def build_index(files: list[descriptor_pb2.FileDescriptorProto]) -> Index:
    index = Index()
    for f in files:
        index.comments.update(_file_comments(f))
        prefix = f".{f.package}" if f.package else ""
        for i, msg in enumerate(f.message_type):
            _index_message(index, f, msg, prefix, (FILE_MESSAGE, i))
        for i, enum in enumerate(f.enum_type):
            name = f"{prefix}.{enum.name}"
            index.types[name] = Located(name, enum, f, (FILE_ENUM, i))
        for desc in f.options.Extensions[resource_pb2.resource_definition]:
            _index_patterns(index, desc)
    return index


def _index_message(
    index: Index,
    f: descriptor_pb2.FileDescriptorProto,
    msg: descriptor_pb2.DescriptorProto,
    prefix: str,
    path: tuple[int, ...],
) -> None:
    name = f"{prefix}.{msg.name}"
    index.types[name] = Located(name, msg, f, path)
    if msg.options.HasExtension(resource_pb2.resource):
        _index_patterns(index, msg.options.Extensions[resource_pb2.resource])
    for i, nested in enumerate(msg.nested_type):
        _index_message(index, f, nested, name, (*path, MESSAGE_NESTED, i))
    for i, enum in enumerate(msg.enum_type):
        enum_name = f"{name}.{enum.name}"
        index.types[enum_name] = Located(enum_name, enum, f, (*path, MESSAGE_ENUM, i))


def _index_patterns(index: Index, desc: resource_pb2.ResourceDescriptor) -> None:
    for pattern in desc.pattern:
        shape, names = [], []
        for segment in pattern.split("/"):
            if segment.startswith("{") and segment.endswith("}"):
                shape.append("*")
                names.append(segment[1:-1])
                index.parent_patterns.setdefault("/".join(shape), list(names))
            else:
                shape.append(segment)
        index.patterns.setdefault("/".join(shape), names)


def _file_comments(f: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[Any, str]]:
    for loc in f.source_code_info.location:
        text = loc.leading_comments or loc.trailing_comments
        if text.strip():
            yield (f.name, tuple(loc.path)), clean_comment(text)


def clean_comment(text: str) -> str:
    """Proto comment text -> description: drop the one space after `//`, keep line breaks."""
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(line.rstrip() for line in lines).strip()


def first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    match = re.match(r"(.+?\.)(\s|$)", flat)
    return match.group(1) if match else flat


# ---------------------------------------------------------------------------------------------
# Path templates (google/api/http.proto grammar) -> OpenAPI paths.


@dataclass(frozen=True)
class PathParam:
    name: str  # the OpenAPI parameter name
    field_path: str  # the request field it fills, e.g. "name"
    template: str  # the variable's segments, e.g. "sessions/*" ("*" for a plain `{field}`)
    named: str  # the same with this path's parameter names, e.g. "sessions/{session}"
    multi_segment: bool  # `**`: the value may contain "/"


@dataclass(frozen=True)
class OpenApiPath:
    path: str
    params: tuple[PathParam, ...]

    @property
    def bound_fields(self) -> frozenset[str]:
        return frozenset(p.field_path for p in self.params)


def split_template(template: str) -> tuple[list[str], str]:
    """Split `/a/{x=b/*}/c:verb` into top-level segments and the verb (braces kept whole)."""
    if not template.startswith("/"):
        raise PluginError(f"http path {template!r} must start with '/'")
    segments, current, depth = [], "", 0
    for char in template[1:]:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise PluginError(f"unbalanced braces in http path {template!r}")
    verb = ""
    if ":" in current and not current.endswith("}"):
        current, verb = current.rsplit(":", 1)
    segments.append(current)
    return segments, verb


def convert_template(template: str, index: Index) -> OpenApiPath:
    segments, verb = split_template(template)
    out: list[str] = []
    params: list[PathParam] = []
    for segment in segments:
        if segment.startswith("{") and segment.endswith("}"):
            field_path, _, sub = segment[1:-1].partition("=")
            out.extend(_expand_variable(field_path, sub or "*", index, params))
        elif segment in ("*", "**"):
            raise PluginError(f"anonymous wildcard in {template!r}: bind it to a field")
        else:
            out.append(segment)
    path = "/" + "/".join(out) + (f":{verb}" if verb else "")
    return OpenApiPath(path, tuple(params))


def _expand_variable(field_path: str, sub: str, index: Index, params: list[PathParam]) -> list[str]:
    parts = sub.split("/")
    shape = "/".join("*" if p in ("*", "**") else p for p in parts)
    wildcards = [p for p in parts if p in ("*", "**")]
    if sub == "*" or sub == "**":
        names = [field_path]
    else:
        names = index.wildcard_names(shape) or _fallback_names(field_path, parts)
    if len(names) != len(wildcards):
        names = _fallback_names(field_path, parts)
    out, taken, chosen = [], {p.name for p in params}, []
    names_iter = iter(names)
    for part in parts:
        if part not in ("*", "**"):
            out.append(part)
            continue
        name = _unique(next(names_iter), taken)
        taken.add(name)
        chosen.append((name, part == "**"))
        out.append("{" + name + "}")
    named = "/".join(out)
    params.extend(PathParam(n, field_path, sub, named, multi) for n, multi in chosen)
    return out


def _fallback_names(field_path: str, parts: list[str]) -> list[str]:
    names = []
    for i, part in enumerate(parts):
        if part not in ("*", "**"):
            continue
        before = parts[i - 1] if i > 0 else ""
        if before and before not in ("*", "**"):
            names.append(_singular(before))
        else:
            names.append(f"{field_path.replace('.', '_')}_{len(names) + 1}")
    return names


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


# ---------------------------------------------------------------------------------------------
# Schemas (proto3 JSON mapping, preserve_proto_field_names).


def field_behaviors(f: descriptor_pb2.FieldDescriptorProto) -> set[int]:
    return set(f.options.Extensions[field_behavior_pb2.field_behavior])


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


class Schemas:
    """Builds components/schemas: every message and enum reached from an operation."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.components: dict[str, Json] = {}
        self._pending: list[str] = []

    def message_ref(self, type_name: str) -> Json:
        """Schema for a field/body/response of message or enum type `type_name` (dotted)."""
        if type_name in WELL_KNOWN:
            if type_name == ".google.protobuf.Any":
                self.components.setdefault(ANY_SCHEMA, any_schema())
            return dict(WELL_KNOWN[type_name])
        if type_name not in self.index.types:
            raise PluginError(f"type {type_name} is not in the request")
        name = type_name.lstrip(".")
        if name not in self.components and type_name not in self._pending:
            self._pending.append(type_name)
        return ref(name)

    def drain(self) -> None:
        """Generate the component of every type referenced so far (and what those reference)."""
        while self._pending:
            type_name = self._pending.pop(0)
            located = self.index.types[type_name]
            name = type_name.lstrip(".")
            if isinstance(located.proto, descriptor_pb2.EnumDescriptorProto):
                self.components[name] = self.enum_schema(located)
            else:
                self.components[name] = {}  # placeholder: recursion stops here
                self.components[name] = self.object_schema(located)

    def enum_schema(self, located: Located) -> Json:
        enum = located.proto
        assert isinstance(enum, descriptor_pb2.EnumDescriptorProto)
        lines = []
        for i, value in enumerate(enum.value):
            doc = self.index.comment(located.file, (*located.path, ENUM_VALUE, i))
            lines.append(f"- `{value.name}`" + (f": {' '.join(doc.split())}" if doc else ""))
        intro = self.index.comment(located.file, located.path)
        return {
            "type": "string",
            "enum": [v.name for v in enum.value],
            "description": "\n\n".join(p for p in (intro, "\n".join(lines)) if p),
        }

    def object_schema(self, located: Located, exclude: frozenset[str] = frozenset()) -> Json:
        """A message as a JSON object; `exclude` drops fields (those bound to the URL path)."""
        msg = located.proto
        assert isinstance(msg, descriptor_pb2.DescriptorProto)
        oneofs = real_oneofs(msg)
        properties: dict[str, Json] = {}
        required: list[str] = []
        for i, f in enumerate(msg.field):
            if f.name in exclude:
                continue
            schema = self.field_schema(f)
            doc = self.index.comment(located.file, (*located.path, MESSAGE_FIELD, i))
            if f.HasField("oneof_index") and f.oneof_index in oneofs:
                group = oneofs[f.oneof_index]
                doc = (doc + "\n\n" if doc else "") + f"Member of oneof `{group}`."
            if doc:
                schema["description"] = doc
            behaviors = field_behaviors(f)
            if field_behavior_pb2.OUTPUT_ONLY in behaviors:
                schema["readOnly"] = True
            if f.options.deprecated:
                schema["deprecated"] = True
            if field_behavior_pb2.REQUIRED in behaviors:
                required.append(f.name)
            properties[f.name] = schema
        schema: Json = {"type": "object", "properties": properties}
        description = self._message_description(located, oneofs)
        if description:
            schema["description"] = description
        if required:
            schema["required"] = required
        return schema

    def _message_description(self, located: Located, oneofs: dict[int, str]) -> str:
        msg = located.proto
        assert isinstance(msg, descriptor_pb2.DescriptorProto)
        parts = [self.index.comment(located.file, located.path)]
        for number, group in sorted(oneofs.items()):
            members = [f"`{f.name}`" for f in msg.field if _in_oneof(f, number)]
            parts.append(f"Oneof `{group}`: at most one of {', '.join(members)} is set.")
        return "\n\n".join(p for p in parts if p)

    def field_schema(self, f: descriptor_pb2.FieldDescriptorProto) -> Json:
        """A field's JSON schema without its description (maps, repeated, scalars, messages)."""
        if f.type == FDP.TYPE_MESSAGE and self.is_map(f):
            entry = self.index.types[f.type_name].proto
            assert isinstance(entry, descriptor_pb2.DescriptorProto)
            value = next(x for x in entry.field if x.name == "value")
            return {"type": "object", "additionalProperties": self.single_schema(value)}
        if f.label == FDP.LABEL_REPEATED:
            return {"type": "array", "items": self.single_schema(f)}
        return self.single_schema(f)

    def single_schema(self, f: descriptor_pb2.FieldDescriptorProto) -> Json:
        if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM, FDP.TYPE_GROUP):
            return self.message_ref(f.type_name)
        return dict(SCALARS[f.type])

    def is_map(self, f: descriptor_pb2.FieldDescriptorProto) -> bool:
        located = self.index.types.get(f.type_name)
        return (
            f.label == FDP.LABEL_REPEATED
            and located is not None
            and isinstance(located.proto, descriptor_pb2.DescriptorProto)
            and located.proto.options.map_entry
        )


def real_oneofs(msg: descriptor_pb2.DescriptorProto) -> dict[int, str]:
    """Oneofs written in the proto (not the synthetic ones of proto3 `optional`)."""
    synthetic = {f.oneof_index for f in msg.field if f.proto3_optional}
    return {i: o.name for i, o in enumerate(msg.oneof_decl) if i not in synthetic}


def _in_oneof(f: descriptor_pb2.FieldDescriptorProto, number: int) -> bool:
    return f.HasField("oneof_index") and f.oneof_index == number


def any_schema() -> Json:
    return {
        "type": "object",
        "description": "A message of any type: `@type` names it, the other keys are its fields.",
        "properties": {"@type": {"type": "string", "description": "The type URL."}},
        "required": ["@type"],
        "additionalProperties": True,
    }


def status_schema() -> Json:
    return {
        "type": "object",
        "description": (
            "The error body (`google.rpc.Status`): a gRPC status code (e.g. 5 NOT_FOUND), a "
            "message a person can act on, and typed details such as `google.rpc.ErrorInfo`."
        ),
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "The gRPC code."},
            "message": {"type": "string", "description": "What went wrong."},
            "details": {
                "type": "array",
                "items": ref(ANY_SCHEMA),
                "description": "Typed details, e.g. `google.rpc.ErrorInfo`.",
            },
        },
        "required": ["code", "message"],
    }


# ---------------------------------------------------------------------------------------------
# Operations.


@dataclass(frozen=True)
class Binding:
    verb: str  # "get", "post", ...
    template: str
    body: str
    response_body: str


def bindings(rule: http_pb2.HttpRule) -> list[Binding]:
    """The rule itself, then its additional_bindings (they cannot nest further)."""
    out = [_binding(rule)]
    out.extend(_binding(extra) for extra in rule.additional_bindings)
    return out


def _binding(rule: http_pb2.HttpRule) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise PluginError("google.api.http rule without a pattern")
    if kind == "custom":
        return Binding(rule.custom.kind.lower(), rule.custom.path, rule.body, rule.response_body)
    return Binding(kind, getattr(rule, kind), rule.body, rule.response_body)


class Operations:
    """Turns every service method with an http rule into path items."""

    def __init__(self, index: Index, schemas: Schemas) -> None:
        self.index = index
        self.schemas = schemas
        self.paths: dict[str, Json] = {}
        self.tags: dict[str, str] = {}

    def add_file(self, f: descriptor_pb2.FileDescriptorProto) -> None:
        for s, service in enumerate(f.service):
            self.tags[service.name] = self.index.comment(f, (FILE_SERVICE, s))
            for m, method in enumerate(service.method):
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                doc = self.index.comment(f, (FILE_SERVICE, s, SERVICE_METHOD, m))
                rule = method.options.Extensions[annotations_pb2.http]
                for n, binding in enumerate(bindings(rule)):
                    op_id = f"{service.name}_{method.name}" + (f"_{n}" if n else "")
                    self._add(binding, self._operation(service.name, method, binding, doc, op_id))

    def _add(self, binding: Binding, operation: tuple[OpenApiPath, Json]) -> None:
        path, op = operation
        item = self.paths.setdefault(path.path, {})
        if binding.verb in item:
            raise PluginError(
                f"{binding.verb.upper()} {path.path} is bound twice "
                f"({item[binding.verb]['operationId']} and {op['operationId']})"
            )
        item[binding.verb] = op

    def _operation(
        self,
        service: str,
        method: descriptor_pb2.MethodDescriptorProto,
        binding: Binding,
        doc: str,
        op_id: str,
    ) -> tuple[OpenApiPath, Json]:
        request = self._message(method.input_type)
        path = convert_template(binding.template, self.index)
        op: Json = {"operationId": op_id, "tags": [service]}
        if doc:
            op["summary"] = first_sentence(doc)
            op["description"] = doc
        params = [self._path_param(request, p) for p in path.params]
        params += self._query_params(request, path, binding)
        if params:
            op["parameters"] = params
        if binding.body:
            op["requestBody"] = self._request_body(request, path, binding, method)
        op["responses"] = {
            "200": self._ok_response(method, binding),
            "default": {"$ref": "#/components/responses/Error"},
        }
        return path, op

    def _message(self, type_name: str) -> Located:
        located = self.index.types.get(type_name)
        if located is None or not isinstance(located.proto, descriptor_pb2.DescriptorProto):
            raise PluginError(f"message {type_name} is not in the request")
        return located

    def _field(
        self, located: Located, name: str
    ) -> tuple[int, descriptor_pb2.FieldDescriptorProto]:
        msg = located.proto
        assert isinstance(msg, descriptor_pb2.DescriptorProto)
        for i, f in enumerate(msg.field):
            if f.name == name:
                return i, f
        raise PluginError(f"{located.full_name.lstrip('.')} has no field {name!r}")

    def _resolve(
        self, located: Located, field_path: str
    ) -> tuple[Located, int, descriptor_pb2.FieldDescriptorProto]:
        """Follow `a.b.c` from the request message to the field it names."""
        *heads, last = field_path.split(".")
        for head in heads:
            _, f = self._field(located, head)
            located = self._message(f.type_name)
        i, f = self._field(located, last)
        return located, i, f

    def _path_param(self, request: Located, param: PathParam) -> Json:
        owner, i, f = self._resolve(request, param.field_path)
        doc = self.index.comment(owner.file, (*owner.path, MESSAGE_FIELD, i))
        if param.template == "*":
            schema = self.schemas.single_schema(f)
            description = doc
        else:
            schema = {"type": "string"}
            description = (
                f"The `{{{param.name}}}` part of `{param.field_path}` = `{param.named}`."
                + (" It may contain `/`." if param.multi_segment else "")
                + (f"\n\n{doc}" if doc else "")
            )
        out: Json = {"name": param.name, "in": "path", "required": True, "schema": schema}
        if description:
            out["description"] = description
        return out

    def _query_params(self, request: Located, path: OpenApiPath, binding: Binding) -> list[Json]:
        """Request fields bound neither to the path nor to the body are query parameters."""
        if binding.body == "*":
            return []
        excluded = set(path.bound_fields) | ({binding.body} if binding.body else set())
        return list(self._flatten(request, "", excluded, seen=(request.full_name,)))

    def _flatten(
        self, located: Located, prefix: str, excluded: set[str], seen: tuple[str, ...]
    ) -> Iterator[Json]:
        msg = located.proto
        assert isinstance(msg, descriptor_pb2.DescriptorProto)
        for i, f in enumerate(msg.field):
            name = prefix + f.name
            if name in excluded:
                continue
            nested = self.index.types.get(f.type_name)
            is_object = (
                f.type == FDP.TYPE_MESSAGE
                and f.type_name not in WELL_KNOWN
                and nested is not None
                and f.label != FDP.LABEL_REPEATED
            )
            if is_object:
                # nested messages travel as `a.b=...`; stop at recursion
                if f.type_name not in seen:
                    yield from self._flatten(nested, name + ".", excluded, (*seen, f.type_name))
                continue
            if f.type == FDP.TYPE_MESSAGE and self.schemas.is_map(f):
                continue  # the transcoder has no query form for maps
            param: Json = {"name": name, "in": "query", "schema": self.schemas.field_schema(f)}
            doc = self.index.comment(located.file, (*located.path, MESSAGE_FIELD, i))
            if doc:
                param["description"] = doc
            if field_behavior_pb2.REQUIRED in field_behaviors(f):
                param["required"] = True
            if f.options.deprecated:
                param["deprecated"] = True
            yield param

    def _request_body(
        self,
        request: Located,
        path: OpenApiPath,
        binding: Binding,
        method: descriptor_pb2.MethodDescriptorProto,
    ) -> Json:
        if binding.body == "*":
            bound = path.bound_fields
            top = frozenset(b for b in bound if "." not in b)
            if top:
                schema = self.schemas.object_schema(request, exclude=top)
            else:
                schema = self.schemas.message_ref(request.full_name)
            description = f"`{request.full_name.lstrip('.')}` without the fields in the path."
        else:
            owner, i, f = self._resolve(request, binding.body)
            schema = self.schemas.field_schema(f)
            description = self.index.comment(owner.file, (*owner.path, MESSAGE_FIELD, i))
        if method.client_streaming:
            schema = {"type": "array", "items": schema}
            description += " Client streaming: a JSON array, one element per message."
        body: Json = {"required": True, "content": {JSON: {"schema": schema}}}
        if description.strip():
            body["description"] = description.strip()
        return body

    def _ok_response(self, method: descriptor_pb2.MethodDescriptorProto, binding: Binding) -> Json:
        if binding.response_body:
            _, _, f = self._resolve(self._message(method.output_type), binding.response_body)
            schema = self.schemas.field_schema(f)
        else:
            schema = self.schemas.message_ref(method.output_type)
        name = method.output_type.lstrip(".")
        headers = {"X-API-Version": {"$ref": "#/components/headers/X-API-Version"}}
        if method.server_streaming:
            return {
                "description": (
                    f"A stream of `{name}` messages as newline-delimited JSON: one object per "
                    "line, sent as each message arrives. The schema is that of one line."
                ),
                "headers": headers,
                "content": {NDJSON: {"schema": schema}},
            }
        return {
            "description": f"`{name}`.",
            "headers": headers,
            "content": {JSON: {"schema": schema}},
        }


# ---------------------------------------------------------------------------------------------
# The document.


def envoy_paths() -> dict[str, Json]:
    """Paths Envoy answers itself (direct_response of this very file)."""
    paths = {}
    for path, op_id in (
        ("/openapi.json", "Envoy_GetOpenApi"),
        ("/v1/openapi.json", "Envoy_GetOpenApiV1"),
    ):
        paths[path] = {
            "get": {
                "operationId": op_id,
                "tags": [ENVOY_TAG],
                "summary": "This OpenAPI document.",
                "description": "Served by Envoy from `gen/openapi/soma.openapi.json`. Public.",
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        }
    return paths


def api_version(files: list[descriptor_pb2.FileDescriptorProto]) -> str:
    versions = sorted({f.package.rsplit(".", 1)[-1] for f in files if f.package})
    return ", ".join(versions) or "v1"


def build_document(request: plugin_pb2.CodeGeneratorRequest) -> Json:
    index = build_index(list(request.proto_file))
    targets = [f for f in request.proto_file if f.name in set(request.file_to_generate)]
    schemas = Schemas(index)
    operations = Operations(index, schemas)
    for f in sorted(targets, key=lambda f: f.name):
        operations.add_file(f)
    schemas.drain()
    schemas.components[STATUS_SCHEMA] = status_schema()
    schemas.components[ANY_SCHEMA] = any_schema()
    paths = {**operations.paths, **envoy_paths()}
    tags = [{"name": n, "description": d} if d else {"name": n} for n, d in operations.tags.items()]
    tags.append({"name": ENVOY_TAG, "description": "Paths served by Envoy itself."})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": api_version(targets),
            "description": (
                "The REST/JSON face of the Soma Mesh gRPC services, as transcoded by Envoy from "
                "the `google.api.http` rules of the contract (proto/). Field names are the proto "
                "field names; 64-bit integers are strings; errors are `google.rpc.Status` bodies "
                "with the matching HTTP status. Every response carries `X-API-Version`. The same "
                "methods are served as gRPC and gRPC-Web on the same port."
            ),
        },
        "servers": [{"url": SERVER_URL, "description": "The local mesh (`soma-mesh up`)."}],
        "tags": sorted(tags, key=lambda t: t["name"]),
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "responses": {
                "Error": {
                    "description": "An error, as a `google.rpc.Status` JSON body.",
                    "content": {JSON: {"schema": ref(STATUS_SCHEMA)}},
                }
            },
            "headers": {
                "X-API-Version": {
                    "description": "The API version that answered, e.g. `v1`.",
                    "schema": {"type": "string"},
                }
            },
        },
    }


def canonical(value: Any, *, keep_order: bool = False) -> Any:
    """Sort mapping keys recursively, except the keys of `properties` (proto field order)."""
    if isinstance(value, dict):
        items = value.items() if keep_order else sorted(value.items())
        return {
            k: canonical(v, keep_order=(k == "properties" and not keep_order)) for k, v in items
        }
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def render(document: Json) -> str:
    return json.dumps(canonical(document), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    try:
        response.file.add(name=OUTPUT_NAME, content=render(build_document(request)))
    except PluginError as exc:
        response.error = f"protoc_gen_openapi: {exc}"
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
