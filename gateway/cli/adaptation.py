"""`tierguard eval --adaptation K` over gRPC: the live gateway the protocol drives.

The protocol and the report are `gateway.offline.adaptation`; this module is
what it needs of a running gateway (`GrpcGateway`: CheckPrompt with a bound on
calls in flight, AddExemplars, DeleteExemplar, GetStats) and, by default, that
gateway itself: `tierguard serve` in a child process on a free loopback port,
with a fresh temporary data directory (the shipped starter pack, nothing an
admin added) and a one-off admin token, stopped when the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.offline.adaptation import (
    AdaptationError,
    AdaptationResult,
    Added,
    Check,
    run_adaptation,
)
from gateway.runtime.config import Config, load_config
from router.evaluation import LabelledText

__all__ = ["GrpcGateway", "adapt", "child_gateway"]

# Worth another try: the gateway was busy or the call timed out on a loaded machine.
_RETRY = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
          grpc.StatusCode.DEADLINE_EXCEEDED}  # fmt: skip
_REASON = "tierguard eval --adaptation"
# Settings of the caller's environment the child gateway must not take.
_NOT_INHERITED = frozenset(
    {"TIERGUARD_STORE_URL", "TIERGUARD_METRICS_PORT", "TIERGUARD_ADMIN_TOKENS"}
)


class GrpcGateway:
    """`LiveGateway` over a grpc.aio channel: checks as a caller, changes as an admin."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str,
        *,
        policy: str = "",
        concurrency: int = 16,
        timeout_s: float = 120.0,
        attempts: int = 3,
    ) -> None:
        self._checks = pb_grpc.GuardrailServiceStub(channel)
        self._admin = apb_grpc.AdminServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._policy = policy
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout_s
        self._attempts = attempts

    async def check(self, text: str) -> Check | None:
        """CheckPrompt; None for a text the gateway refuses; other errors raise after retries."""
        request = pb.CheckPromptRequest(text=text, policy=self._policy)
        async with self._slots:
            for attempt in range(self._attempts):
                try:
                    reply = await self._checks.CheckPrompt(request, timeout=self._timeout)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        return None
                    if exc.code() not in _RETRY or attempt + 1 == self._attempts:
                        raise
                await asyncio.sleep(0.5 * 2**attempt)
        verdict = reply.verdict
        return Check(verdict.decision != pb.DECISION_ALLOW, verdict.index_version)

    async def add(self, rows: Sequence[LabelledText]) -> Added:
        """One AddExemplars batch of `rows` as risky exemplars (the server's duplicate rules)."""
        exemplars = [
            apb.Exemplar(text=r.text, label=pb.LABEL_RISKY, category=r.category,
                         source=f"adaptation:{r.file}", reason=_REASON)
            for r in rows
        ]  # fmt: skip
        request = apb.AddExemplarsRequest(exemplars=exemplars, request_id=uuid.uuid4().hex)
        reply = await self._admin.AddExemplars(request, metadata=self._metadata, timeout=300.0)
        ids = tuple(r.exemplar_id for r in reply.results if r.status == apb.ADD_STATUS_ADDED)
        return Added(ids, len(reply.results) - len(ids), reply.index_version)

    async def remove(self, exemplar_ids: Sequence[str]) -> int:
        """DeleteExemplar, one by one: only what this run added, whatever else changes."""
        version = -1
        for exemplar_id in exemplar_ids:
            reply = await self._admin.DeleteExemplar(
                apb.DeleteExemplarRequest(exemplar_id=exemplar_id, reason=_REASON),
                metadata=self._metadata,
                timeout=300.0,
            )
            version = reply.index_version
        return version

    async def exemplar_count(self) -> tuple[int, int]:
        """GetStats: the index version and the live exemplars."""
        stats = await self._admin.GetStats(
            apb.GetStatsRequest(), metadata=self._metadata, timeout=60.0
        )
        return stats.index_version, sum(c.count for c in stats.exemplar_counts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def child_gateway(
    config: Config, config_path: Path | None, *, start_timeout_s: float = 900.0
) -> Iterator[tuple[str, str]]:
    """`tierguard serve` in a child process; yields its address and admin token.

    The data directory is fresh (so the index is the shipped starter pack) and
    temporary; its `models` links to the configured models directory so the
    ONNX export is made once and kept. The child's log goes to a file and is
    quoted if it fails to start.

    Raises:
        SystemExit: the child exited or did not report SERVING in time.
    """
    token = secrets.token_hex(24)
    models = (config.embedding.models_dir or config.data_dir / "models").resolve()
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tierguard-adaptation-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        (data_dir / "models").symlink_to(models, target_is_directory=True)
        port = _free_port()
        command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--data-dir", str(data_dir)]  # fmt: skip
        if config_path is not None:
            command += ["--config", str(config_path)]
        # a shared store would not be a fresh index, and a metrics port may be taken
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env["TIERGUARD_ADMIN_TOKENS"] = token
        log_path = Path(tmp) / "serve.log"
        with log_path.open("wb") as log:  # the child keeps its own descriptor
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        # SIGTERM would end this process without unwinding, leaving the child serving
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
        try:
            _wait_serving(child, port, start_timeout_s, log_path)
            yield f"127.0.0.1:{port}", token
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_serving(child: subprocess.Popen[bytes], port: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SystemExit(
                    f"tierguard: the gateway for --adaptation exited ({child.returncode}):\n"
                    + _tail(log)
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"tierguard: the gateway for --adaptation did not start in {timeout_s:.0f} s")


async def _drive(
    address: str, token: str, rows: Sequence[LabelledText], args: argparse.Namespace, where: str
) -> AdaptationResult:
    async with grpc.aio.insecure_channel(address) as channel:
        gateway = GrpcGateway(channel, token, policy=args.policy, concurrency=args.concurrency)
        return await run_adaptation(
            gateway, rows, k=args.adaptation, groups=args.groups, benign_sample=args.benign_sample,
            seed=args.seed, where=where, progress=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip


def adapt(
    args: argparse.Namespace, config: Config, rows: Sequence[LabelledText]
) -> AdaptationResult:
    """Run adaptation against `--address` (with `--token`), else against a child gateway.

    Raises:
        SystemExit: a refused call or a gateway that did not come back, in one line.
    """
    try:
        if args.address:
            token = args.token or os.environ.get("TIERGUARD_ADMIN_TOKEN", "")
            if not token:
                raise SystemExit("tierguard: --address needs an admin token (--token or "
                                 "TIERGUARD_ADMIN_TOKEN)")  # fmt: skip
            return asyncio.run(_drive(args.address, token, rows, args, args.address))
        if args.config is not None and load_config(args.config, environ={}).store.url:
            # the child reads the same file: it would add and remove exemplars in that database
            raise SystemExit("tierguard: --adaptation starts a gateway of its own, and the config "
                             "file's store.url would point it at a shared database whose "
                             "exemplars it changes; use a config without store.url, or "
                             "--address a test gateway")  # fmt: skip
        if config.server.tls_cert_file or config.server.require_api_key:
            raise SystemExit("tierguard: --adaptation starts a plaintext gateway without API "
                             "keys; use a config without TLS and require_api_key, or --address")  # fmt: skip
        print("starting a gateway (fresh data directory: the shipped exemplars) ...",
              file=sys.stderr, flush=True)  # fmt: skip
        with child_gateway(config, args.config) as (address, token):
            where = f"a child `tierguard serve` on {address}"
            return asyncio.run(_drive(address, token, rows, args, where))
    except grpc.RpcError as exc:  # every client error is also a call, with a code and details
        code, details = getattr(exc, "code", lambda: None)(), getattr(exc, "details", str)()
        name = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
        raise SystemExit(f"tierguard: --adaptation: {name}: {details}") from None
    except AdaptationError as exc:
        raise SystemExit(f"tierguard: --adaptation: {exc}") from None
