"""`python -m services.audit`: the Audit service. Its contract (proto/soma/audit/v1) is complete;
its implementation is issue #4, so until then every method answers UNIMPLEMENTED."""

from services.common.server import serve
from services.common.unimplemented import unimplemented_opener
from soma.audit.v1 import audit_pb2_grpc

if __name__ == "__main__":
    serve(
        "audit",
        unimplemented_opener(
            "soma.audit.v1.AuditService", audit_pb2_grpc.add_AuditServiceServicer_to_server, 4
        ),
    )
