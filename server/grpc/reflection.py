"""Server reflection that also resolves fully-qualified method names.

grpcio-reflection answers ``file_containing_symbol`` for services and messages but not
for methods (``riskwire.v1.Scoring.Score``), which the reflection spec allows and ghz
asks for. :class:`MethodAwareReflectionServicer` falls back to the enclosing service
when a symbol is ``<service>.<method>``.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc


class MethodAwareReflectionServicer(reflection.ReflectionServicer):
    """ReflectionServicer whose symbol lookup understands method names."""

    def __init__(self, service_names: Iterable[str], pool=None) -> None:  # noqa: ANN001
        super().__init__(service_names, pool=pool)
        self._lookup_pool = pool or descriptor_pool.Default()

    def _file_containing_symbol(self, request, fully_qualified_name: str):  # noqa: ANN001, ANN202
        service_name, _, method_name = fully_qualified_name.rpartition(".")
        try:
            self._lookup_pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            try:
                service = self._lookup_pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is not None and method_name in service.methods_by_name:
                fully_qualified_name = service_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Register reflection (v1alpha, which grpcurl and ghz use) for ``service_names``."""
    names = [*service_names, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodAwareReflectionServicer(names), server
    )
