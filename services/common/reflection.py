"""Server reflection that also resolves method symbols.

Clients such as ghz ask for `file_containing_symbol` with a full method name
(`soma.gateway.v1.GatewayService.GetSession`). Python's descriptor pool only knows services and
messages by name, so without this the answer is "Symbol not found" and ghz cannot use
reflection. We fall back from a method symbol to the file of its service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha.reflection import SERVICE_NAME as REFLECTION_SERVICE

from services.common.contract import load_contract


class MethodAwareReflectionServicer(ReflectionServicer):
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response") and "." in fully_qualified_name:
            parent, _, method = fully_qualified_name.rpartition(".")
            try:
                self._pool.FindServiceByName(parent).FindMethodByName(method)
            except KeyError:
                return response
            return super()._file_containing_symbol(request, parent)
        return response


def enable_reflection(server: aio.Server, service_names: Iterable[str]) -> None:
    load_contract()
    names = [*service_names, REFLECTION_SERVICE]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodAwareReflectionServicer(names), server
    )
