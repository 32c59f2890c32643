"""The whole v1 contract, loaded into the default descriptor pool.

Envoy routes reflection to the Gateway, so every server must be able to describe any soma
service (ghz resolves `soma.keys.v1.KeysService.GetApiKey` through it); importing the
generated modules registers their descriptors.
"""

from __future__ import annotations

import importlib

SERVICES: dict[str, str] = {
    "gateway": "soma.gateway.v1.GatewayService",
    "keys": "soma.keys.v1.KeysService",
    "audit": "soma.audit.v1.AuditService",
    "capsule": "soma.capsule.v1.CapsuleService",
}


def load_contract() -> None:
    for short in SERVICES:
        importlib.import_module(f"soma.{short}.v1.{short}_pb2")
