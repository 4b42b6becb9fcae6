"""`tierguard serve --workers N`: N gateway processes on one port, and their supervisor.

Why processes: one Python process runs gRPC, tier 0 and the event loop on
about one core (the GIL); N workers, each a complete `tierguard serve` with
its own FAISS index following the shared store, use N. They share the
listening port through SO_REUSEPORT, and the kernel spreads *connections*
over them (by a hash of each connection's addresses): one client channel
stays with one worker, so a client that is to use every worker opens several
connections, as a load balancer in front does.

The supervisor is the process the operator started. It

* refuses N > 1 on the SQLite default, in one line with exit status 2: each
  worker would keep its own index and nothing follows a SQLite store, so an
  exemplar added through one worker would never reach the others' decisions;
* checks that the port is free and holds it with a socket bound with
  SO_REUSEPORT that never listens (it gets no connections), so that port 0
  becomes one free port for every worker and nothing else takes the port
  between the workers' starts;
* starts each worker as a fresh interpreter (`subprocess`: fork and exec at
  once; nothing is forked with gRPC or the model's threads running), in a
  session of its own, so that a terminal's Ctrl-C reaches the supervisor
  only, which then stops the workers in order;
* serves the one `/metrics` (`metrics.port`): the workers write their series
  to files in a fresh `PROMETHEUS_MULTIPROC_DIR`, and the supervisor sums them
  (see `gateway.runtime.metrics`);
* forwards SIGTERM and SIGINT (a graceful stop: each worker finishes its calls
  in flight) and SIGHUP (each worker re-reads the config file);
* when a worker dies unexpectedly, stops the others and exits non-zero,
  naming the worker and how it ended.

Why stop rather than restart a dead worker: whatever runs the gateway
(systemd, Kubernetes, a container runtime) already restarts a failed process,
with backoff and a record an operator sees; a supervisor that restarted its
own workers quietly would hide a crash loop (a worker killed for memory, a
store it cannot open) behind a gateway that looks up at a fraction of its
capacity. A worker that cannot start (a bad constitution, a store it cannot
reach) stops the gateway with the worker's own exit status (2, after its one
line), as a lone `serve` would. Workers watch the supervisor too: one whose
supervisor is gone (killed with SIGKILL) stops itself within a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import multiprocess

if TYPE_CHECKING:
    from gateway.runtime.config import Config

__all__ = ["supervise"]

log = logging.getLogger(__name__)

# How often the supervisor looks at its workers and at the signals it received.
_POLL_S = 0.1
# Beyond the workers' grace for calls in flight: closing the stores, the model's threads.
_STOP_MARGIN_S = 15.0


def supervise(args: argparse.Namespace, config: Config) -> int:
    """Run `config.server.workers` workers of `tierguard serve` until told to stop.

    Returns the exit status: 0 after a requested stop, else the status of the
    worker that ended unexpectedly (1 if it was killed by a signal).

    Raises:
        SystemExit: (with a one-line message) no shared store, one that cannot be
            reached, or the port is in use.
    """
    count = config.server.workers
    if config.store.url is None:
        raise SystemExit(
            f"tierguard: {count} workers (--workers, server.workers) need a shared PostgreSQL "
            "store: on the SQLite default each worker would keep its own index and none would "
            "see the others' changes; give --store-url postgresql://... (or store.url, "
            "TIERGUARD_STORE_URL), or run one worker"
        )
    _check_store(config)
    host = config.server.host
    hold = _hold_port(host, config.server.port)
    port = int(hold.getsockname()[1])
    try:
        with tempfile.TemporaryDirectory(prefix="tierguard-metrics-") as metrics_dir:
            return _Supervisor(args, config, port, Path(metrics_dir)).run()
    finally:
        hold.close()


def _check_store(config: Config) -> None:
    """One query on the store before any worker starts: an unreachable database is
    one line from the supervisor, not one from every worker."""
    from embeddings_index.database import DatabaseError, Storage

    storage = Storage(config.store.url, config.data_dir, pool_size=1)
    try:
        database = storage.open("exemplars")
        try:
            database.query("SELECT 1")
        finally:
            database.close()
    except DatabaseError as exc:
        raise SystemExit(f"tierguard: cannot open the store: {exc}") from None
    finally:
        storage.close()


def _hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, never listening: the workers' port.

    A fixed port must be free first: with SO_REUSEPORT alone, another gateway of
    the same user already listening there would silently share it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        if port:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
                probe.bind(address)
        hold = socket.socket(family, kind, proto)
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind(address)
        except OSError:
            hold.close()
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SystemExit(f"tierguard: cannot listen on {host}:{port}: {reason}") from None
    return hold


@dataclass
class _Worker:
    """One worker process and its number (0 to N-1, as its metrics and logs name it)."""

    index: int
    process: subprocess.Popen[bytes]


class _Supervisor:
    """Starts, watches and stops the workers; serves their metrics."""

    def __init__(
        self, args: argparse.Namespace, config: Config, port: int, metrics_dir: Path
    ) -> None:
        self._args = args
        self._config = config
        self._port = port
        self._metrics_dir = metrics_dir
        self._workers: list[_Worker] = []
        self._signals: list[int] = []

    def run(self) -> int:
        from gateway.runtime.metrics import serve_fleet_metrics

        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        metrics = None
        try:
            if self._config.metrics.port is not None:
                host = self._config.server.host
                metrics = serve_fleet_metrics(self._metrics_dir, host, self._config.metrics.port)
                log.info("metrics of every worker on http://%s:%d/metrics", host, metrics.port)
            for index in range(self._config.server.workers):
                self._workers.append(_Worker(index, self._spawn(index)))
            log.info(
                "tierguard: %d workers on %s:%d (pids %s)",
                len(self._workers), self._config.server.host, self._port,
                ", ".join(str(w.process.pid) for w in self._workers),
            )  # fmt: skip
            return self._watch()
        finally:
            self._stop_all()
            if metrics is not None:
                metrics.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # acted on by _watch, outside the handler

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        args, config = self._args, self._config
        command = [sys.executable, "-m", "gateway.cli", "--log-level", args.log_level]
        if args.log_format:
            command += ["--log-format", args.log_format]
        command += ["serve", "--port", str(self._port), "--host", config.server.host]
        command += ["--workers", str(config.server.workers)]
        if args.config is not None:
            command += ["--config", str(args.config)]
        # the parsed values, so that each worker reads what the supervisor read
        command += ["--data-dir", str(config.data_dir)]
        if args.store_url is not None:
            command += ["--store-url", args.store_url]
        command += ["--worker-index", str(index), "--worker-of", str(os.getpid())]
        environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        return subprocess.Popen(command, env=environ, start_new_session=True)

    def _watch(self) -> int:
        """Until a stop signal (0) or a worker's end (its status, at least 1)."""
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: the workers re-read the config")
                    self._signal_all(signal.SIGHUP)
                    continue
                log.info("%s: stopping the workers", signal.Signals(signum).name)
                return self._stop_all()
            for worker in self._workers:
                status = worker.process.poll()
                if status is not None:
                    log.error(
                        "worker %d (pid %d) %s; stopping the other workers",
                        worker.index, worker.process.pid, _ended(status),
                    )  # fmt: skip
                    self._stop_all()
                    return status if status > 0 else 1
            time.sleep(_POLL_S)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _stop_all(self) -> int:
        """SIGTERM every live worker and wait for them (SIGKILL past the grace); 0 if all
        stopped cleanly."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self._config.server.grace_seconds + _STOP_MARGIN_S
        clean = True
        for worker in self._workers:
            try:
                status = worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop: killed", worker.index,
                          worker.process.pid)  # fmt: skip
                worker.process.kill()
                status = worker.process.wait()
            clean = clean and status in (0, -signal.SIGTERM)  # -SIGTERM: stopped while starting
            multiprocess.mark_process_dead(worker.process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        self._workers = [w for w in self._workers if w.process.poll() is None]
        return 0 if clean else 1


def _ended(status: int) -> str:
    """How a worker ended, in words: `exited with status 3`, `was killed by SIGKILL`."""
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
