"""Cross-cutting concerns of every RPC: request ids, credentials, load shedding, error mapping.

Servicers stay thin: they raise `gateway.runtime.errors` exceptions and this module
turns them into statuses with details. Any other exception becomes INTERNAL
with the request id (never a stack trace), and an undecodable request
becomes INVALID_ARGUMENT instead of gRPC's generic deserialisation failure.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from gateway.api.status import to_status
from gateway.runtime.auth import ANONYMOUS, Credentials, Principal, Role, bearer_token
from gateway.runtime.errors import (
    GatewayError,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)

__all__ = ["PRINCIPAL", "REQUEST_ID", "GatewayInterceptor"]

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS
)

_UNDECODABLE = object()


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary handlers of the check and admin services.

    Args:
        check_services: Services whose calls count against `max_concurrent` and
            need a tenant key or admin token when `require_api_key()` says so.
        admin_services: Services that need an admin token.
        credentials: Returns the current credentials (they change on reload).
        require_api_key: Returns whether check calls need a credential.
        max_concurrent: Check calls in flight beyond which new ones are refused
            with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        *,
        check_services: set[str],
        admin_services: set[str],
        credentials: Callable[[], Credentials],
        require_api_key: Callable[[], bool],
        max_concurrent: int,
    ) -> None:
        self._check = check_services
        self._admin = admin_services
        self._credentials = credentials
        self._require_api_key = require_api_key
        self._max_concurrent = max_concurrent
        self._in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else ""
        if (
            handler is None
            or handler.unary_unary is None
            or service not in self._check | self._admin
        ):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(handler.unary_unary, admin=service in self._admin),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _authorize(self, metadata: dict[str, str], *, admin: bool) -> Principal:
        principal = self._credentials().identify(bearer_token(metadata))
        if principal is None:
            raise Unauthenticated("the credential in 'authorization: Bearer ...' is not valid")
        if admin:
            if principal.role is Role.ANONYMOUS:
                raise Unauthenticated(
                    "admin calls need an admin token: send 'authorization: Bearer <token>'"
                )
            if principal.role is not Role.ADMIN:
                raise PermissionDenied("this credential may not call the admin service")
        elif principal.role is Role.ANONYMOUS and self._require_api_key():
            raise Unauthenticated(
                "this gateway needs an API key: send 'authorization: Bearer <key>'"
            )
        return principal

    def _wrap(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], *, admin: bool
    ):
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {
                k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
            }
            request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:64]
            token = REQUEST_ID.set(request_id)
            counted = not admin
            self._in_flight += counted
            try:
                principal_token = PRINCIPAL.set(self._authorize(metadata, admin=admin))
                try:
                    if request is _UNDECODABLE:
                        raise InvalidArgument(
                            "request",
                            "the message could not be decoded; strings must be valid UTF-8",
                        )
                    if counted and self._in_flight > self._max_concurrent:
                        raise Overloaded(
                            f"more than {self._max_concurrent} checks in flight; retry with backoff"
                        )
                    return await behavior(request, context)
                finally:
                    PRINCIPAL.reset(principal_token)
            except GatewayError as exc:
                await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("unexpected error in request %s", request_id)
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error; quote request id {request_id} when reporting it",
                )
            finally:
                self._in_flight -= counted
                REQUEST_ID.reset(token)

        return wrapper


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize
