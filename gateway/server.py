"""The gRPC server: GuardrailService plus the standard health and reflection services.

`start_server` is what the CLI and the tests both use, so tests exercise the
production wiring on a loopback port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.app import Gateway
from gateway.guardrail_servicer import GuardrailServicer
from gateway.interceptors import GatewayInterceptor

__all__ = ["RunningServer", "serve", "start_server"]

log = logging.getLogger(__name__)

GUARDRAIL_SERVICE = pb.DESCRIPTOR.services_by_name["GuardrailService"].full_name


@dataclass
class RunningServer:
    """A started server, the port it listens on, and its health service."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    gateway: Gateway

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Report NOT_SERVING, let calls in flight finish, then stop."""
        await self.health.enter_graceful_shutdown()
        grace = self.gateway.config.server.grace_seconds if grace_seconds is None else grace_seconds
        await self.server.stop(grace)
        await self.gateway.aclose()


async def start_server(
    gateway: Gateway, *, host: str | None = None, port: int | None = None
) -> RunningServer:
    """Start serving `gateway`; port 0 picks a free port (see `RunningServer.port`)."""
    config = gateway.config.server
    server = grpc.aio.server(
        interceptors=[
            GatewayInterceptor({GUARDRAIL_SERVICE}, max_concurrent=config.max_concurrent_checks)
        ],
        options=[("grpc.max_receive_message_length", 4 * config.max_text_chars + 65536)],
    )
    pb_grpc.add_GuardrailServiceServicer_to_server(GuardrailServicer(gateway), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [GUARDRAIL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{host or config.host}:{config.port if port is None else port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", GUARDRAIL_SERVICE):
        await health_servicer.set(name, serving)
    log.info("tierguard listening on %s", address.rsplit(":", 1)[0] + f":{bound}")
    return RunningServer(server=server, port=bound, health=health_servicer, gateway=gateway)


async def serve(gateway: Gateway) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    running = await start_server(gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing calls in flight")
    await running.stop()
