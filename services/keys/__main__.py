"""`python -m services.keys`: the Keys service. Its contract (proto/soma/keys/v1) is complete;
its implementation is issue #3, so until then every method answers UNIMPLEMENTED."""

from services.common.server import serve
from services.common.unimplemented import unimplemented_opener
from soma.keys.v1 import keys_pb2_grpc

if __name__ == "__main__":
    serve(
        "keys",
        unimplemented_opener(
            "soma.keys.v1.KeysService", keys_pb2_grpc.add_KeysServiceServicer_to_server, 3
        ),
    )
