"""The methods callable without credentials, declared once.

Soma methods are public when the contract says so (`option (soma.api.v1.method_policy).public =
true`); infrastructure every server carries (health, reflection) is listed here. Nothing else
decides what is public.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pool

from services.common.contract import SERVICES, load_contract
from soma.api.v1 import annotations_pb2

INFRASTRUCTURE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@cache
def public_methods() -> frozenset[str]:
    """gRPC paths (`/pkg.Service/Method`) of the contract's public methods."""
    load_contract()
    pool = descriptor_pool.Default()
    paths = set()
    for full_name in SERVICES.values():
        service = pool.FindServiceByName(full_name)
        for method in service.methods:
            policy = method.GetOptions().Extensions[annotations_pb2.method_policy]
            if policy.public:
                paths.add(f"/{full_name}/{method.name}")
    return frozenset(paths)


def is_public(method: str) -> bool:
    return method.startswith(INFRASTRUCTURE_PREFIXES) or method in public_methods()
