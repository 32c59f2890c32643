"""`python -m services.capsule`: the Capsule service. Its contract (proto/soma/capsule/v1) is
complete; its implementation is issue #5, so until then every method answers UNIMPLEMENTED."""

from services.common.server import serve
from services.common.unimplemented import unimplemented_opener
from soma.capsule.v1 import capsule_pb2_grpc

if __name__ == "__main__":
    serve(
        "capsule",
        unimplemented_opener(
            "soma.capsule.v1.CapsuleService",
            capsule_pb2_grpc.add_CapsuleServiceServicer_to_server,
            5,
        ),
    )
