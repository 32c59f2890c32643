#!/usr/bin/env python3
"""buf local plugin: Python messages, .pyi and gRPC stubs via grpc_tools.protoc.

buf hands us a CodeGeneratorRequest on stdin. We write the request's files (with their
imports) to a descriptor set and let grpc_tools' bundled protoc compile from it, so no
`protoc` binary is needed and the output is what protoc itself would write.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        fds = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        fds_path = Path(tmp) / "in.binpb"
        fds_path.write_bytes(fds.SerializeToString())
        args = [
            "protoc",
            f"--descriptor_set_in={fds_path}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed: " + " ".join(args)
        else:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
