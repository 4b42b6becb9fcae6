"""The one table from the runtime's errors to gRPC statuses with rich details.

`InvalidArgument` carries a `BadRequest.FieldViolation` naming the field; every
other error an `ErrorInfo(reason, domain="tierguard", metadata)`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway.runtime.errors import ERROR_DOMAIN, GatewayError, InvalidArgument

__all__ = ["grpc_code", "to_status"]


def grpc_code(error: GatewayError) -> grpc.StatusCode:
    """The gRPC status code of `error`."""
    return grpc.StatusCode[error.code.value]


def to_status(error: GatewayError) -> status_pb2.Status:
    """The google.rpc.Status that carries `error` to the client."""
    return status_pb2.Status(
        code=getattr(code_pb2, error.code.value), message=error.message, details=_details(error)
    )


def _details(error: GatewayError) -> list[any_pb2.Any]:
    detail: error_details_pb2.BadRequest | error_details_pb2.ErrorInfo
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        detail = error_details_pb2.BadRequest(field_violations=[violation])
    else:
        detail = error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    packed = any_pb2.Any()
    packed.Pack(detail)
    return [packed]
