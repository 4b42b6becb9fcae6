"""The gRPC server: GuardrailService, AdminService, health and reflection.

`start_server` is what the CLI and the tests both use, so tests exercise the
production wiring on a loopback port. `serve` adds signals: SIGTERM/SIGINT
stop gracefully; SIGHUP re-reads the config file (a bad file is rejected with
a clear message and the old config stays in force).

A lone gateway owns its port: gRPC sets SO_REUSEPORT by default, under which
a second gateway started on a busy port would silently take half of its
connections (each with its own index). It is turned off, so that start fails
instead (`ListenError`). Only the workers of `serve --workers` share a port,
on purpose (`reuse_port=True`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what `health.aio` re-exports
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from gateway._proto.guardrail.v1 import admin_pb2, admin_pb2_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.admin_servicer import AdminServicer
from gateway.api.guardrail_servicer import GuardrailServicer
from gateway.api.interceptors import GatewayInterceptor
from gateway.runtime.app import Gateway
from gateway.runtime.config import ConfigError, ServerConfig, check_reload, load_config
from gateway.runtime.metrics import serve_metrics

__all__ = [
    "ListenError",
    "RunningServer",
    "receive_limit_bytes",
    "reload_config",
    "serve",
    "start_server",
]

log = logging.getLogger(__name__)

# How often a worker of `serve --workers` checks that its supervisor is still there.
_SUPERVISOR_CHECK_S = 1.0

GUARDRAIL_SERVICE = pb.DESCRIPTOR.services_by_name["GuardrailService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

# gRPC's own default receive limit: the server never admits less.
_GRPC_DEFAULT_RECEIVE_BYTES = 4 * 1024 * 1024
# The most texts of `max_text_chars` one check request carries: CheckResponseRequest's
# prompt and response (CheckPrompt and Generate carry one).
_TEXTS_PER_CHECK = 2
# UTF-8 spends at most 4 bytes on a character (emoji, most of CJK Extension B).
_MAX_UTF8_BYTES_PER_CHAR = 4
# Field tags and lengths, the policy name, and room to spare.
_FRAMING_BYTES = 64 * 1024


class ListenError(OSError):
    """The server cannot listen on its address (in use by another process, or not local)."""


@dataclass
class RunningServer:
    """A started server, the port it listens on, and its health service."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    gateway: Gateway

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Report NOT_SERVING, let calls in flight finish, then stop."""
        await self.health.enter_graceful_shutdown()
        grace = self.gateway.config.server.grace_seconds if grace_seconds is None else grace_seconds
        await self.server.stop(grace)
        await self.gateway.aclose()


def receive_limit_bytes(max_text_chars: int) -> int:
    """The largest request message the server reads, for texts of `max_text_chars`.

    Every valid check request fits: two texts (CheckResponse's prompt and
    response) of `max_text_chars` characters at 4 bytes each, plus framing. It
    is never below gRPC's default of 4 MiB, so that a text that is merely too
    long (up to about 4 MB; 1,000,000 characters of ASCII, say) reaches the
    servicer and is answered INVALID_ARGUMENT naming the field and the
    character limit, rather than RESOURCE_EXHAUSTED from gRPC about bytes.
    Only a message above this limit gets gRPC's RESOURCE_EXHAUSTED ("Received
    message larger than max (N vs. LIMIT)").

    Admin requests share the limit (gRPC has one per server): AddExemplars
    carries up to 1,000 texts, which at the character limit and 4 bytes a
    character would be 80 MB at the default 20,000, too much to buffer for
    every caller, so a batch must fit the limit too: a client splits a batch
    of long texts into smaller calls (at 20,000 characters of 4-byte text, 52
    fit in 4 MiB; typical exemplars are a few hundred bytes).
    """
    per_check = _TEXTS_PER_CHECK * _MAX_UTF8_BYTES_PER_CHAR * max_text_chars + _FRAMING_BYTES
    return max(_GRPC_DEFAULT_RECEIVE_BYTES, per_check)


async def start_server(
    gateway: Gateway,
    *,
    host: str | None = None,
    port: int | None = None,
    max_checks_per_caller: int | None = None,
    reuse_port: bool = False,
) -> RunningServer:
    """Start serving `gateway`; port 0 picks a free port (see `RunningServer.port`).

    `reuse_port`: share the port with other processes that ask for it too
    (SO_REUSEPORT; the workers of `serve --workers`, between which the kernel
    spreads new connections); otherwise a port in use is a `ListenError`.

    Requests up to `receive_limit_bytes(server.max_text_chars)` are read (set
    at start: a reload that raises `max_text_chars` past it needs a restart).
    `max_checks_per_caller` (default `server.max_checks_per_caller`) > 0 caps
    the checks one caller (an API key, else a peer address) has in flight, so
    that one client cannot take every slot of `server.max_concurrent_checks`;
    0 leaves only the server-wide cap. (Behind a proxy, anonymous callers share
    the proxy's address, hence one cap.) Both are read at start.
    """
    config = gateway.config.server
    if max_checks_per_caller is None:
        max_checks_per_caller = config.max_checks_per_caller
    tracing = (
        # outermost: the request's span (continuing the caller's traceparent); only when
        # spans are recorded (the instrumentation logs spurious "Failed to detach
        # context" errors for cancelled streams, open-telemetry-python-contrib#2357)
        [aio_server_interceptor(tracer_provider=gateway.tracer_provider)]  # type: ignore[no-untyped-call]
        if gateway.tracer_provider is not None
        else []
    )
    server = grpc.aio.server(
        interceptors=[
            *tracing,
            GatewayInterceptor(
                check_services={GUARDRAIL_SERVICE},
                admin_services={ADMIN_SERVICE},
                credentials=lambda: gateway.credentials,
                require_api_key=lambda: gateway.config.server.require_api_key,
                max_concurrent=config.max_concurrent_checks,
                max_per_caller=max_checks_per_caller,
                metrics=gateway.metrics,
            ),
        ],
        options=[
            ("grpc.max_receive_message_length", receive_limit_bytes(config.max_text_chars)),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    pb_grpc.add_GuardrailServiceServicer_to_server(GuardrailServicer(gateway), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(gateway), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [GUARDRAIL_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{host or config.host}:{config.port if port is None else port}"
    credentials = _tls_credentials(config)
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # gRPC's words for a failed bind
        bound = 0
    if not bound:
        raise ListenError(f"cannot listen on {address}: the port is in use or the host not local")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", GUARDRAIL_SERVICE, ADMIN_SERVICE):
        await health_servicer.set(name, serving)
    scheme = "mTLS" if config.tls_client_ca_file else "TLS" if credentials else "plaintext"
    log.info("tierguard listening on %s:%d (%s)", address.rsplit(":", 1)[0], bound, scheme)
    return RunningServer(server=server, port=bound, health=health_servicer, gateway=gateway)


def _tls_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS when a client CA is set) from PEM files, or None for plaintext."""
    if not config.tls_cert_file or not config.tls_key_file:
        return None
    try:
        chain = config.tls_cert_file.read_bytes()
        key = config.tls_key_file.read_bytes()
        client_ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
    except OSError as exc:
        raise ConfigError(f"server TLS: cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def reload_config(gateway: Gateway) -> bool:
    """Re-read the config file the gateway started from; keep the old one if it is bad.

    Called from the SIGHUP handler, so it never raises: a file that is broken,
    empty or unreadable, or that would turn API keys off or remove every
    tenant or admin token (`check_reload`), is rejected with one log line
    naming the file and why, and the running config stays in force.
    """
    source = gateway.config.source
    if source is None:
        log.warning("SIGHUP: the gateway was started without a config file; nothing to reload")
        return False
    try:
        config = load_config(source, overrides={"data_dir": str(gateway.config.data_dir)})
        check_reload(gateway.config, config)
        gateway.reload(config)
    except ConfigError as exc:
        log.error("SIGHUP: config %s rejected, the old config stays in force: %s", source, exc)
        return False
    except Exception:  # a bug: keep serving on the old config, with the traceback in the log
        log.exception(
            "SIGHUP: config %s could not be applied, the old config stays in force", source
        )
        return False
    log.info(
        "SIGHUP: config %s reloaded; policies %s",
        source,
        [p.name for p in gateway.policies.all()],
    )
    return True


async def serve(gateway: Gateway, *, supervisor_pid: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; with `metrics.port`
    set, `/metrics` is served on that port too.

    `supervisor_pid`: this is a worker of `serve --workers` started by that
    process. The port is shared with the other workers, `/metrics` is the
    supervisor's, and the worker stops (gracefully) once its supervisor is
    gone, so that no orphan keeps answering on the port with nobody to stop it.
    """
    worker = supervisor_pid is not None
    running = await start_server(gateway, reuse_port=worker)
    metrics_port = None if worker else gateway.config.metrics.port
    metrics = None
    if metrics_port is not None:
        metrics = serve_metrics(gateway.metrics, gateway.config.server.host, metrics_port)
        log.info("metrics on http://%s:%d/metrics", gateway.config.server.host, metrics.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, gateway)
    watch = (
        asyncio.create_task(_stop_without_supervisor(supervisor_pid, stop))
        if supervisor_pid is not None
        else None
    )
    await stop.wait()
    if watch is not None:
        watch.cancel()
    log.info("shutting down: finishing calls in flight")
    await running.stop()
    if metrics is not None:
        metrics.stop()


async def _stop_without_supervisor(supervisor_pid: int, stop: asyncio.Event) -> None:
    """Set `stop` once this process's parent is no longer `supervisor_pid` (it died)."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(_SUPERVISOR_CHECK_S)
    log.warning("the supervisor (pid %d) is gone: this worker stops", supervisor_pid)
    stop.set()
