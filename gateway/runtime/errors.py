"""The gateway's errors: why a request could not be processed.

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

The runtime raises these without knowing gRPC: each names its canonical
status code (`StatusCode`); `gateway.api.status` turns them into a
`google.rpc.Status` and the interceptor sends it. Any other exception becomes
INTERNAL without a stack trace. A decision (BLOCK, REVISE) is never an error.
"""

from __future__ import annotations

import enum

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
    "StatusCode",
    "Unauthenticated",
    "Unavailable",
]

ERROR_DOMAIN = "tierguard"

# A requested name is echoed in an error at most this long: the message must
# stay small whatever the caller sent.
_MAX_ECHOED_NAME = 64


class StatusCode(enum.Enum):
    """The canonical status codes the gateway answers with (google.rpc.Code names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class GatewayError(Exception):
    """Base of the gateway's errors: the request could not be processed."""

    code = StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(GatewayError):
    """A request field is missing or malformed."""

    code = StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class PolicyNotFound(GatewayError):
    """The request named a policy the gateway does not have.

    The message never lists the other policies (a tenant must not learn them)
    and echoes at most `_MAX_ECHOED_NAME` characters of the name asked for.
    """

    code = StatusCode.NOT_FOUND
    reason = "POLICY_NOT_FOUND"

    def __init__(self, name: str) -> None:
        shown = echo(name)
        super().__init__(
            f"policy {shown!r} does not exist; ask the gateway's operator for your policy "
            "name, or leave the policy empty to use your default",
            policy=shown,
        )


def echo(value: str) -> str:
    """`value` cut to a length that is safe to repeat in an error message."""
    if len(value) <= _MAX_ECHOED_NAME:
        return value
    return f"{value[:_MAX_ECHOED_NAME]}... ({len(value)} characters)"


class NotFound(GatewayError):
    """The named object does not exist."""

    code = StatusCode.NOT_FOUND

    def __init__(self, message: str, *, reason: str = "NOT_FOUND") -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(GatewayError):
    """The call carries no valid credential."""

    code = StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(GatewayError):
    """The credential is valid but may not do this."""

    code = StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Overloaded(GatewayError):
    """Too many checks are in flight; the caller should back off and retry."""

    code = StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class DeadlineTooShort(GatewayError):
    """The caller's deadline leaves no time to do the work."""

    code = StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_TOO_SHORT"


class FailedPrecondition(GatewayError):
    """The server is not set up for this call (e.g. Generate without a generator)."""

    code = StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, reason: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(GatewayError):
    """A part the gateway depends on failed; retrying later may succeed."""

    code = StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, reason: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.reason = reason
