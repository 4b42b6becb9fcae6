"""Cross-cutting concerns of every RPC: request ids, load shedding, error mapping.

Servicers stay thin: they raise `gateway.errors` exceptions and this module
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

from gateway.errors import GatewayError, InvalidArgument, Overloaded, to_status

__all__ = ["REQUEST_ID", "GatewayInterceptor"]

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_UNDECODABLE = object()


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary handlers of the given services.

    Args:
        services: Full service names to wrap, e.g. "guardrail.v1.GuardrailService".
        max_concurrent: Calls in flight (across these services) beyond which
            new calls are refused with RESOURCE_EXHAUSTED.
    """

    def __init__(self, services: set[str], *, max_concurrent: int) -> None:
        self._services = services
        self._max_concurrent = max_concurrent
        self._in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = (
            handler_call_details.method.rsplit("/", 2)[-2] if handler_call_details.method else ""
        )
        if handler is None or handler.unary_unary is None or service not in self._services:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]):
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:64]
            token = REQUEST_ID.set(request_id)
            self._in_flight += 1
            try:
                if request is _UNDECODABLE:
                    raise InvalidArgument(
                        "request", "the message could not be decoded; strings must be valid UTF-8"
                    )
                if self._in_flight > self._max_concurrent:
                    raise Overloaded(
                        f"more than {self._max_concurrent} checks in flight; retry with backoff"
                    )
                return await behavior(request, context)
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
                self._in_flight -= 1
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
