"""Cross-cutting concerns of every RPC: request ids, credentials, load shedding, error mapping.

Servicers stay thin: they raise `gateway.runtime.errors` exceptions and this module
turns them into statuses with details. A store that cannot be reached (a
`DatabaseError`: PostgreSQL down) becomes UNAVAILABLE, which callers retry.
Any other exception becomes INTERNAL
with the request id (never a stack trace), and an undecodable request
becomes INVALID_ARGUMENT instead of gRPC's generic deserialisation failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from embeddings_index.database import DatabaseError
from gateway.api.status import to_status
from gateway.runtime.auth import ANONYMOUS, Credentials, Principal, Role, bearer_token
from gateway.runtime.errors import (
    GatewayError,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from gateway.runtime.metrics import Metrics

__all__ = [
    "PRINCIPAL", "REQUEST_ID", "GatewayInterceptor", "ServicerContext", "caller_key",
]  # fmt: skip

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=ANONYMOUS
)

# The servicers' context: any request and response type.
ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
Behavior: TypeAlias = Callable[[Any, ServicerContext], Awaitable[Any]]
StreamBehavior: TypeAlias = Callable[[AsyncIterator[Any], ServicerContext], AsyncIterator[Any]]
UnaryStreamBehavior: TypeAlias = Callable[[Any, ServicerContext], AsyncIterator[Any]]

_UNDECODABLE = object()


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the unary handlers of the check and admin services, and the check streams.

    Args:
        check_services: Services whose calls count against `max_concurrent` and
            need a tenant key or admin token when `require_api_key()` says so.
        admin_services: Services that need an admin token.
        credentials: Returns the current credentials (they change on reload).
        require_api_key: Returns whether check calls need a credential.
        max_concurrent: Check calls in flight beyond which new ones are refused
            with RESOURCE_EXHAUSTED.
        max_per_caller: Check calls one caller may have in flight (0: no such
            cap). A caller is its credential's principal, or its peer address
            when anonymous. Beyond it the caller's new checks are refused with
            RESOURCE_EXHAUSTED (ErrorInfo metadata scope=caller; the server-wide
            refusal says scope=server), so one client cannot take every slot
            of `max_concurrent` and shut the others out. Behind a proxy every
            anonymous caller has the proxy's address and shares one cap: give
            clients API keys there, or leave the cap off.
    """

    def __init__(
        self,
        *,
        check_services: set[str],
        admin_services: set[str],
        credentials: Callable[[], Credentials],
        require_api_key: Callable[[], bool],
        max_concurrent: int,
        max_per_caller: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self._check = check_services
        self._admin = admin_services
        self._credentials = credentials
        self._require_api_key = require_api_key
        self._max_concurrent = max_concurrent
        self._max_per_caller = max_per_caller
        self._in_flight = 0
        self._in_flight_by_caller: dict[str, int] = {}
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else ""
        rpc = method.rsplit("/", 1)[-1]
        if handler is None or service not in self._check | self._admin:
            return handler
        if handler.stream_stream is not None and service in self._check:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(cast(StreamBehavior, handler.stream_stream), rpc),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and service in self._check:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_unary_stream(cast(UnaryStreamBehavior, handler.unary_stream), rpc),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(cast(Behavior, handler.unary_unary), rpc, admin=service in self._admin),
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

    def _wrap(self, behavior: Behavior, rpc: str, *, admin: bool) -> Behavior:
        async def wrapper(request: Any, context: ServicerContext) -> Any:
            async with self._admitted(context, rpc, admin=admin):
                return await behavior(_decodable(request), context)
            raise AssertionError("unreachable: an error ends the call with its status")

        return wrapper

    def _wrap_stream(self, behavior: StreamBehavior, rpc: str) -> StreamBehavior:
        """A bidirectional check stream: admitted and counted like a unary check for as
        long as it is open; its errors end it with their status."""

        async def wrapper(
            requests: AsyncIterator[Any], context: ServicerContext
        ) -> AsyncIterator[Any]:
            async with self._admitted(context, rpc, admin=False), self._streaming():
                async for response in behavior(_decoded(requests), context):
                    yield response

        return wrapper

    def _wrap_unary_stream(self, behavior: UnaryStreamBehavior, rpc: str) -> UnaryStreamBehavior:
        """A check with a streamed answer (GenerateStream): as `_wrap_stream`."""

        async def wrapper(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            async with self._admitted(context, rpc, admin=False), self._streaming():
                async for response in behavior(_decodable(request), context):
                    yield response

        return wrapper

    @contextlib.asynccontextmanager
    async def _streaming(self) -> AsyncIterator[None]:
        """Count a stream as in flight while it is open."""
        if self._metrics is None:
            yield
            return
        self._metrics.streams.inc()
        try:
            yield
        finally:
            self._metrics.streams.dec()

    def _count(self, rpc: str, code: str, error: GatewayError | None = None) -> None:
        """Count a call answered with the status `code` (its name, e.g. "OK")."""
        if self._metrics is None:
            return
        self._metrics.requests.labels(rpc, code).inc()
        if isinstance(error, Overloaded):
            self._metrics.overload.labels(error.metadata.get("scope", "server")).inc()

    @contextlib.asynccontextmanager
    async def _admitted(
        self, context: ServicerContext, rpc: str, *, admin: bool
    ) -> AsyncIterator[None]:
        """Request id, credentials and load shedding around one call; a `GatewayError`
        raised inside becomes its status, any other exception INTERNAL."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:64]
        token = REQUEST_ID.set(request_id)
        counted = not admin
        self._in_flight += counted
        caller: str | None = None
        try:
            principal = self._authorize(metadata, admin=admin)
            principal_token = PRINCIPAL.set(principal)
            try:
                if counted and self._in_flight > self._max_concurrent:
                    raise Overloaded(
                        f"more than {self._max_concurrent} checks in flight; retry with backoff",
                        scope="server",
                    )
                if counted and self._max_per_caller > 0:
                    caller = self._admit_caller(principal, context)
                yield
                self._count(rpc, "OK")
            finally:
                with contextlib.suppress(ValueError):  # reset in another context
                    PRINCIPAL.reset(principal_token)
        except GatewayError as exc:
            self._count(rpc, exc.code.name, exc)
            await cast(Any, context).abort_with_status(rpc_status.to_status(to_status(exc)))
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except DatabaseError:
            log.exception("the store failed in request %s", request_id)
            unavailable = Unavailable(
                f"the store is unavailable; retry with backoff (request id {request_id})",
                reason="STORE_UNAVAILABLE",
            )
            self._count(rpc, unavailable.code.name, unavailable)
            await cast(Any, context).abort_with_status(rpc_status.to_status(to_status(unavailable)))
        except Exception:
            self._count(rpc, "INTERNAL")
            log.exception("unexpected error in request %s", request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error; quote request id {request_id} when reporting it",
            )
        finally:
            self._in_flight -= counted
            if caller is not None:
                self._release_caller(caller)
            with contextlib.suppress(ValueError):
                REQUEST_ID.reset(token)

    def _admit_caller(self, principal: Principal, context: ServicerContext) -> str:
        """Count one more check in flight for the caller, or refuse it if it has its share.

        Raises:
            Overloaded: the caller already has `max_per_caller` checks in flight.
        """
        caller = caller_key(principal, context)
        held = self._in_flight_by_caller.get(caller, 0)
        if held >= self._max_per_caller:
            raise Overloaded(
                f"this caller already has {held} checks in flight, its share of this gateway; "
                "wait for answers before sending more, or retry with backoff",
                scope="caller",
            )
        self._in_flight_by_caller[caller] = held + 1
        return caller

    def _release_caller(self, caller: str) -> None:
        held = self._in_flight_by_caller.pop(caller, 1) - 1
        if held > 0:
            self._in_flight_by_caller[caller] = held


def caller_key(principal: Principal, context: ServicerContext) -> str:
    """Who shares a per-caller cap: one credential, else one peer address (any port)."""
    if principal.role is not Role.ANONYMOUS:
        return f"{principal.role.value}:{principal.name}"
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rsplit(":", 1)[0]  # the port changes with every connection
    return f"peer:{kind}:{address}"


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's requests; an undecodable one ends the stream with INVALID_ARGUMENT."""
    async for request in requests:
        yield _decodable(request)


def _decodable(request: Any) -> Any:
    """`request`, unless it could not be decoded: then INVALID_ARGUMENT."""
    if request is _UNDECODABLE:
        raise InvalidArgument(
            "request", "the message could not be decoded; strings must be valid UTF-8"
        )
    return request


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize
