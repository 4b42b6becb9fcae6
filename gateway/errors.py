"""The gateway's errors and the one table that maps them to gRPC statuses.

    GatewayError                      -> INTERNAL (message carries the request id)
    ├── InvalidArgument(field, ...)   -> INVALID_ARGUMENT + BadRequest.FieldViolation
    ├── PolicyNotFound(name)          -> NOT_FOUND + ErrorInfo(POLICY_NOT_FOUND)
    ├── NotFound                      -> NOT_FOUND + ErrorInfo(<reason>)
    ├── Unauthenticated               -> UNAUTHENTICATED + ErrorInfo(UNAUTHENTICATED)
    ├── PermissionDenied              -> PERMISSION_DENIED + ErrorInfo(PERMISSION_DENIED)
    ├── Overloaded                    -> RESOURCE_EXHAUSTED + ErrorInfo(OVERLOADED)
    ├── DeadlineTooShort              -> DEADLINE_EXCEEDED + ErrorInfo(DEADLINE_TOO_SHORT)
    ├── FailedPrecondition            -> FAILED_PRECONDITION + ErrorInfo(<reason>)
    └── Unavailable                   -> UNAVAILABLE + ErrorInfo(<reason>)

Servicers raise these; `interceptors.ErrorInterceptor` turns them into
statuses, and any other exception into INTERNAL without a stack trace.
A decision (BLOCK, REVISE) is never an error.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "ERROR_DOMAIN",
    "DeadlineTooShort",
    "FailedPrecondition",
    "GatewayError",
    "InvalidArgument",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PolicyNotFound",
    "Unauthenticated",
    "Unavailable",
    "to_status",
]

ERROR_DOMAIN = "tierguard"


class GatewayError(Exception):
    """Base of the gateway's errors: the request could not be processed."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    def details(self) -> list[any_pb2.Any]:
        """Error details for the google.rpc.Status: an ErrorInfo by default."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class InvalidArgument(GatewayError):
    """A request field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=self.field, description=self.description
        )
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return [packed]


class PolicyNotFound(GatewayError):
    """The request named a policy the gateway does not have."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "POLICY_NOT_FOUND"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"policy {name!r} does not exist; known policies: {', '.join(sorted(known))}",
            policy=name,
        )


class NotFound(GatewayError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, *, reason: str = "NOT_FOUND") -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(GatewayError):
    """The call carries no valid credential."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    """The credential is valid but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Overloaded(GatewayError):
    """Too many checks are in flight; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class DeadlineTooShort(GatewayError):
    """The caller's deadline leaves no time to do the work."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_TOO_SHORT"


class FailedPrecondition(GatewayError):
    """The server is not set up for this call (e.g. Generate without a generator)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, reason: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(GatewayError):
    """A part the gateway depends on failed; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, reason: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.reason = reason


_CODES = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}


def to_status(error: GatewayError) -> status_pb2.Status:
    """The google.rpc.Status that carries `error` to the client."""
    return status_pb2.Status(
        code=_CODES[error.code], message=error.message, details=error.details()
    )
