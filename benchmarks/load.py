"""Load generator: CheckPrompt over gRPC on loopback, naive vs fast, in one run.

Why a ratio: absolute numbers on a shared 2-core machine move with its mood;
the same sweep against a naive configuration (torch, one text per model call,
no batching) in the same run makes the result a ratio that holds still.

Each configuration runs the production server (`Gateway.create` +
`start_server`) in its own subprocess, so its CPU time and peak memory are
its own and not the load generator's. Clients are grpc.aio stubs in this
process: a closed-loop sweep over concurrency levels for each traffic profile,
then an open-loop run at half the configuration's peak throughput (latency
measured from each request's scheduled send time, so a stalled server cannot
hide its queue).

    python benchmarks/load.py --quick                 # about 2-3 minutes
    python benchmarks/load.py --json load.json        # the full sweep
    python benchmarks/load.py --workers 1 2 --channels 8   # serve --workers, on PostgreSQL

`--workers N [N ...]` measures `tierguard serve --workers N` instead (the fast
configuration's settings, the real CLI and supervisor, on a fresh schema of
the PostgreSQL database `--store-url`, which several workers need). The
kernel spreads connections, not calls, over workers, so the clients then
spread their calls over `--channels` connections of their own (the same
number for every N, so that only the worker count changes); CPU and memory
are the supervisor's and its workers' together.

Profiles: `short` is banking77.jsonl (support queries); `mixed` is every benign
prompt in ../shared/datasets, shuffled. Servers log at WARNING (both configs
alike) so that per-request INFO lines do not dominate what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import DEFAULT_DATA, DEFAULT_WORK_DIR, ROOT

from embeddings_index.database import scratch_schema
from embeddings_index.vocabulary import Label
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc

CONFIGS = ("naive", "fast")
PROFILES = ("short", "mixed")


# -- the server side (runs in a subprocess: `load.py --serve NAME`) ----------------------


async def serve(args: argparse.Namespace) -> None:
    """Start the production server for one configuration; print its port; serve until told."""
    import logging

    from gateway.api.server import start_server
    from gateway.runtime.app import Gateway
    from gateway.runtime.config import load_config

    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s: %(message)s")
    # One data dir per embedding model: a store switched between models re-embeds everything.
    backend = "torch" if args.serve == "naive" else args.fast_backend
    overrides: dict[str, Any] = {
        "data_dir": str(args.work_dir / f"data-{args.serve}-{backend}"),
        "embedding.backend": backend,
        # ONNX exports are shared between runs and data dirs.
        "embedding.models_dir": str(args.work_dir / "models"),
        "server.host": "127.0.0.1",
        "server.port": 0,
        "embedding.max_batch": 1 if args.serve == "naive" else args.max_batch,
        "embedding.max_wait_ms": 0 if args.serve == "naive" else args.max_wait_ms,
    }
    if args.serve == "naive" or not args.fast_cache:
        # The profiles cycle through a few thousand texts, so a cache would soon answer
        # from memory and measure the cache rather than the model path.
        overrides |= {"embedding.cache_size": 0, "embedding.route_cache_size": 0}
    for item in args.set or []:
        config_name, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        if config_name == args.serve:
            overrides[key] = value
    config = load_config(None, environ={}, overrides=overrides)
    gateway = Gateway.create(config, environ={})  # local critic, no LLM
    embedder = gateway.embedder
    running = await start_server(gateway, port=0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {running.port} {embedder.model_id} {type(embedder).__name__}", flush=True)
    await stop.wait()
    await running.stop(grace_seconds=0)


# -- the client side --------------------------------------------------------------------


@dataclass
class Level:
    """One measured window at one load."""

    config: str
    profile: str
    mode: str  # "closed" (fixed concurrency) or "open" (fixed arrival rate)
    concurrency: int
    target_rps: float | None
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_cores: float
    client_cpu_cores: float
    server_peak_rss_mb: float | None
    server_rss_mb: float
    loadavg_1m: float  # the machine's 1-minute load average after the window (others' work too)


class ServerProcess:
    """A configuration's server in a subprocess, with CPU and memory readings.

    With `serve --workers` the readings are the supervisor's and every worker's, summed.
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        import psutil

        self.name = name
        if name.startswith("workers"):
            self._start_workers(int(name.removeprefix("workers")), args)
            self.ps = psutil.Process(self.proc.pid)
            return
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            name,
            "--work-dir",
            str(args.work_dir),
            "--fast-backend",
            args.fast_backend,
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
        ]
        command += ["--fast-cache"] if args.fast_cache else []
        command += [f"--set={item}" for item in args.set or []]
        self.name = name
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"the {name} server did not start (exit {self.proc.wait()})")
        _, port, self.model_id, self.embedder = line.split()
        self.port = int(port)
        # Keep draining the pipe, so a chatty library can never block the server on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)

    def _start_workers(self, workers: int, args: argparse.Namespace) -> None:
        """`tierguard serve --workers N` with the fast configuration's settings, on PostgreSQL."""
        import yaml

        port = _free_port()
        embedding: dict[str, Any] = {
            "backend": args.fast_backend, "models_dir": str(args.work_dir / "models"),
            "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        }  # fmt: skip
        if not args.fast_cache:
            embedding |= {"cache_size": 0, "route_cache_size": 0}
        settings: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port},
            "data_dir": str(args.work_dir / f"data-{self.name}"),
            "store": {"url": args.store_url},
            "embedding": embedding,
        }
        for item in args.set or []:  # --set workers2:embedding.threads=1
            config_name, _, assignment = item.partition(":")
            key, _, value = assignment.partition("=")
            if config_name == self.name:
                section, _, field = key.rpartition(".")
                node = settings.setdefault(section, {}) if section else settings
                node[field] = yaml.safe_load(value)
        config = args.work_dir / f"{self.name}.yaml"
        config.write_text(yaml.safe_dump(settings))
        command = [sys.executable, "-m", "gateway.cli", "--log-level", "warning", "serve",
                   "--config", str(config), "--workers", str(workers)]  # fmt: skip
        self.proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL)
        self.port = port
        self.model_id, self.embedder = args.fast_backend, f"serve --workers {workers}"
        deadline = time.monotonic() + 900
        while not _serving(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start (exit {self.proc.returncode})")
            time.sleep(0.5)
        time.sleep(5)  # every worker up, not only the first to answer

    def _processes(self) -> list[Any]:
        """The server and its workers (psutil processes)."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except Exception:  # psutil.NoSuchProcess: gone
            return [self.ps]

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self._processes():
            times = process.cpu_times()
            total += float(times.user + times.system)
        return total

    def reset_peak(self) -> bool:
        """Reset the kernel's peak-RSS mark (VmHWM), so each level reports its own peak."""
        try:
            for process in self._processes():
                Path(f"/proc/{process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_rss_mb(self) -> float | None:
        total = 0.0
        try:
            for process in self._processes():
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            return None
        return total or None

    def rss_mb(self) -> float:
        return sum(float(p.memory_info().rss) for p in self._processes()) / 2**20

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TextSource:
    """Prompts in a fixed shuffled order, shared by all clients; counts repeats."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.next = 0

    def take(self) -> str:
        text = self.texts[self.next % len(self.texts)]
        self.next += 1
        return text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serving(port: int) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class Stubs:
    """CheckPrompt stubs over `n` connections of their own, taken in turn.

    One channel is one TCP connection, and the kernel hands each connection to
    one worker of `serve --workers`; several spread the calls.
    """

    def __init__(self, port: int, n: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(n)
        ]
        self._stubs = [pb_grpc.GuardrailServiceStub(c) for c in self.channels]
        self._next = 0

    def take(self) -> pb_grpc.GuardrailServiceStub:
        stub = self._stubs[self._next % len(self._stubs)]
        self._next += 1
        return stub

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def check(stubs: Stubs, text: str) -> bool:
    """One CheckPrompt; True when it answered with a verdict."""
    try:
        reply = await stubs.take().CheckPrompt(pb.CheckPromptRequest(text=text), timeout=60.0)
    except grpc.aio.AioRpcError:
        return False
    return reply.verdict.decision != pb.DECISION_UNSPECIFIED


def _cpu_self() -> float:
    times = os.times()
    return times.user + times.system


def _level(
    server: ServerProcess,
    profile: str,
    mode: str,
    concurrency: int,
    target: float | None,
    seconds: float,
    latencies: list[float],
    errors: int,
    cpu: tuple[float, float],
    peak_ok: bool,
) -> Level:
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return Level(
        config=server.name,
        profile=profile,
        mode=mode,
        concurrency=concurrency,
        target_rps=target,
        seconds=round(seconds, 2),
        requests=len(latencies),
        errors=errors,
        rps=len(latencies) / seconds,
        p50_ms=float(np.percentile(lat, 50)),
        p90_ms=float(np.percentile(lat, 90)),
        p99_ms=float(np.percentile(lat, 99)),
        server_cpu_cores=cpu[0] / seconds,
        client_cpu_cores=cpu[1] / seconds,
        server_peak_rss_mb=server.peak_rss_mb() if peak_ok else None,
        server_rss_mb=server.rss_mb(),
        loadavg_1m=os.getloadavg()[0],
    )


async def closed_loop(
    server: ServerProcess,
    stub: Stubs,
    profile: str,
    source: TextSource,
    concurrency: int,
    warmup: float,
    duration: float,
) -> Level:
    """`concurrency` clients, each sending its next request when the last one answers."""
    latencies: list[float] = []
    errors = 0
    recording = False
    stop = False

    async def client() -> None:
        nonlocal errors
        while not stop:
            start = time.perf_counter()
            ok = await check(stub, source.take())
            if recording and not stop:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    peak_ok = server.reset_peak()
    cpu0 = (server.cpu_seconds(), _cpu_self())
    t0 = time.perf_counter()
    recording = True
    await asyncio.sleep(duration)
    stop = True
    elapsed = time.perf_counter() - t0
    cpu = (server.cpu_seconds() - cpu0[0], _cpu_self() - cpu0[1])
    await asyncio.gather(*tasks)
    return _level(
        server, profile, "closed", concurrency, None, elapsed, latencies, errors, cpu, peak_ok
    )


async def open_loop(
    server: ServerProcess,
    stub: Stubs,
    profile: str,
    source: TextSource,
    rate: float,
    duration: float,
) -> Level:
    """Requests at a fixed rate whatever the answers; latency from the scheduled send time."""
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float) -> None:
        nonlocal errors
        ok = await check(stub, source.take())
        if ok:
            latencies.append(time.perf_counter() - scheduled)
        else:
            errors += 1

    peak_ok = server.reset_peak()
    cpu0 = (server.cpu_seconds(), _cpu_self())
    t0 = time.perf_counter()
    tasks = []
    n = int(rate * duration)
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = (server.cpu_seconds() - cpu0[0], _cpu_self() - cpu0[1])
    level = _level(server, profile, "open", 0, rate, elapsed, latencies, errors, cpu, peak_ok)
    level.rps = len(latencies) / max(duration, elapsed)
    return level


def load_profiles(data_dir: Path, seed: int) -> dict[str, list[str]]:
    """short: banking77 queries; mixed: every benign prompt of the labelled files. Shuffled."""
    from router.evaluation import read_labelled

    rng = random.Random(seed)
    profiles: dict[str, list[str]] = {"short": [], "mixed": []}
    for path in sorted(data_dir.glob("*.jsonl")):
        for row in read_labelled(path):
            if row.label != Label.BENIGN or not row.text.strip():
                continue
            profiles["mixed"].append(row.text)
            if path.name == "banking77.jsonl":
                profiles["short"].append(row.text)
    for texts in profiles.values():
        rng.shuffle(texts)
    return profiles


async def sweep(
    args: argparse.Namespace, profiles: dict[str, list[str]]
) -> tuple[list[Level], dict[str, Any]]:
    """Start every configuration's server, then measure them level by level, interleaved.

    Why interleaved: other work on the machine comes and goes; running naive and
    fast back to back at each level exposes both to the same background, so
    the ratio holds even when the absolute numbers wander.
    """
    servers: dict[str, ServerProcess] = {}
    info: dict[str, Any] = {}
    levels: list[Level] = []
    try:
        for name in args.configs:
            started = time.perf_counter()
            servers[name] = server = ServerProcess(name, args)
            info[name] = {
                "model_id": server.model_id,
                "embedder": server.embedder,
                "startup_s": round(time.perf_counter() - started, 1),
                "requests_sent": {},
            }
            print(
                f"[{name}] server up on port {server.port} ({server.embedder}, "
                f"{info[name]['startup_s']} s to start)",
                flush=True,
            )
        stubs = {n: Stubs(s.port, args.channels) for n, s in servers.items()}
        try:
            for profile in args.profiles:
                sources = {name: TextSource(profiles[profile]) for name in servers}
                for concurrency in args.concurrency:
                    for name, server in servers.items():
                        level = await closed_loop(
                            server,
                            stubs[name],
                            profile,
                            sources[name],
                            concurrency,
                            args.warmup,
                            args.duration,
                        )
                        levels.append(level)
                        print(_row(level), flush=True)
                for name, server in servers.items():
                    peak = max(
                        lv.rps
                        for lv in levels
                        if (lv.config, lv.profile, lv.mode) == (name, profile, "closed")
                    )
                    level = await open_loop(
                        server, stubs[name], profile, sources[name], peak / 2, args.duration
                    )
                    levels.append(level)
                    print(_row(level), flush=True)
                    info[name]["requests_sent"][profile] = sources[name].next
        finally:
            for group in stubs.values():
                await group.close()
    finally:
        for server in servers.values():
            server.stop()
    return levels, info


# -- reporting --------------------------------------------------------------------------

_HEADER = (
    f"{'config':<8} {'profile':<6} {'load':>10} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
    f"{'p99 ms':>8} {'err':>4} {'srv cpu':>7} {'cli cpu':>7} {'peak MB':>8} {'loadavg':>7}"
)


def _row(lv: Level) -> str:
    load = f"c={lv.concurrency}" if lv.mode == "closed" else f"{lv.target_rps:.0f}/s open"
    peak = f"{lv.server_peak_rss_mb:>8.0f}" if lv.server_peak_rss_mb else f"{'-':>8}"
    return (
        f"{lv.config:<8} {lv.profile:<6} {load:>10} {lv.rps:>8.1f} {lv.p50_ms:>8.1f} "
        f"{lv.p90_ms:>8.1f} {lv.p99_ms:>8.1f} {lv.errors:>4} {lv.server_cpu_cores:>7.2f} "
        f"{lv.client_cpu_cores:>7.2f} {peak} {lv.loadavg_1m:>7.1f}"
    )


def worker_ratios(levels: Sequence[Level]) -> list[dict[str, Any]]:
    """`serve --workers N` against --workers 1: throughput at each profile and concurrency."""
    by = {(lv.config, lv.profile, lv.concurrency): lv for lv in levels if lv.mode == "closed"}
    out = []
    for (config, profile, concurrency), level in sorted(by.items()):
        one = by.get(("workers1", profile, concurrency))
        if config.startswith("workers") and config != "workers1" and one and one.rps:
            out.append({
                "config": config, "profile": profile, "concurrency": concurrency,
                "rps": level.rps, "workers1_rps": one.rps, "ratio": level.rps / one.rps,
            })  # fmt: skip
    return out


def ratios(levels: Sequence[Level]) -> list[dict[str, Any]]:
    """fast/naive throughput at each profile and concurrency."""
    by = {(lv.config, lv.profile, lv.concurrency): lv for lv in levels if lv.mode == "closed"}
    out = []
    for (config, profile, concurrency), fast in sorted(by.items()):
        naive = by.get(("naive", profile, concurrency))
        if config == "fast" and naive and naive.rps:
            out.append(
                {
                    "profile": profile,
                    "concurrency": concurrency,
                    "fast_rps": fast.rps,
                    "naive_rps": naive.rps,
                    "ratio": fast.rps / naive.rps,
                }
            )
    return out


def issue_checks(levels: Sequence[Level]) -> list[dict[str, Any]]:
    """The issue's targets, read off this run (informational: speed is never a test)."""
    closed = {(lv.config, lv.profile, lv.concurrency): lv for lv in levels if lv.mode == "closed"}
    opened = {(lv.config, lv.profile): lv for lv in levels if lv.mode == "open"}
    checks = []

    def add(what: str, value: float | None, target: str, ok: bool | None) -> None:
        checks.append({"check": what, "value": value, "target": target, "ok": ok})

    for profile, need in (("short", 8.0), ("mixed", 4.0)):
        fast, naive = closed.get(("fast", profile, 32)), closed.get(("naive", profile, 32))
        if fast and naive:
            ratio = fast.rps / naive.rps if naive.rps else float("inf")
            add(f"{profile} c=32 fast/naive", ratio, f">= {need:g}x", ratio >= need)
        if fast and profile == "short":
            add("short c=32 fast req/s", fast.rps, ">= 300", fast.rps >= 300)
    lone = closed.get(("fast", "short", 1))
    if lone:
        add("short lone request p50 ms (c=1)", lone.p50_ms, "<= 10", lone.p50_ms <= 10)
    half = opened.get(("fast", "short"))
    if half:
        add(
            f"short p99 ms at half peak ({half.target_rps:.0f}/s)",
            half.p99_ms,
            "< 50",
            half.p99_ms < 50,
        )
    return checks


def print_summary(levels: Sequence[Level], info: dict[str, Any]) -> None:
    """The full table, the ratios and the issue's checks."""
    print("\n" + _HEADER + "\n" + "-" * len(_HEADER))
    for lv in levels:
        print(_row(lv))
    print("\nsrv/cli cpu: cores busy in the server / load-generator process over the window;")
    print("peak MB: the server's peak RSS during the window (VmHWM, reset per level);")
    print("loadavg: the machine's 1-minute load average (2 cores: above 2, others compete).")
    print("\nfast/naive throughput (closed loop)")
    for r in ratios(levels):
        print(
            f"  {r['profile']:<6} c={r['concurrency']:<3} {r['fast_rps']:>8.1f} / "
            f"{r['naive_rps']:>7.1f} = {r['ratio']:>5.1f}x"
        )
    if any(lv.config.startswith("workers") for lv in levels):
        print("\nserve --workers N / --workers 1 throughput (closed loop)")
        for r in worker_ratios(levels):
            print(
                f"  {r['config']:<8} {r['profile']:<6} c={r['concurrency']:<3} {r['rps']:>8.1f} / "
                f"{r['workers1_rps']:>7.1f} = {r['ratio']:>5.2f}x"
            )
    print("\nissue 5 targets (this run)")
    for c in issue_checks(levels):
        mark = {True: "ok  ", False: "MISS", None: "?   "}[c["ok"]]
        print(f"  {mark} {c['check']}: {c['value']:.1f} (target {c['target']})")
    for name, meta in info.items():
        sent = meta.get("requests_sent", {})
        print(
            f"  [{name}] {meta['embedder']} ({meta['model_id']}), started in "
            f"{meta['startup_s']} s; requests sent per profile {sent}"
        )


async def run(args: argparse.Namespace) -> int:
    profiles = load_profiles(args.data, args.seed)
    empty = [name for name in args.profiles if not profiles[name]]
    if empty:
        raise SystemExit(
            f"no benign prompts for profile(s) {empty} in {args.data}: "
            "point --data at the labelled JSONL directory (../shared/datasets)"
        )
    print(
        f"profiles: short {len(profiles['short'])} texts, mixed {len(profiles['mixed'])} texts; "
        f"concurrency {args.concurrency}; {args.warmup:g} s warm-up + {args.duration:g} s per "
        f"level; fast = {args.fast_backend}, max_batch {args.max_batch}"
    )
    print(_HEADER + "\n" + "-" * len(_HEADER), flush=True)
    levels, info = await sweep(args, profiles)
    print_summary(levels, info)
    if args.json:
        doc = {
            "meta": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "argv": sys.argv[1:],
                "servers": info,
            },
            "levels": [asdict(lv) for lv in levels],
            "ratios": ratios(levels),
            "worker_ratios": worker_ratios(levels),
            "checks": issue_checks(levels),
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short windows (1 s warm-up, 3 s per level) for a smoke run",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--duration", type=float, help="seconds measured per level (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds before each level (default 2)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        metavar="N",
        help="measure `tierguard serve --workers N` for each N instead of --configs "
        "(on PostgreSQL, see --store-url)",
    )
    parser.add_argument(
        "--store-url",
        default=os.environ.get(
            "TIERGUARD_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="--workers: PostgreSQL database; each run uses a fresh schema of it, dropped after",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="client connections the calls are spread over (default 1; use several with "
        "--workers: each connection goes to one worker)",
    )
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    parser.add_argument(
        "--fast-backend",
        choices=["onnx", "onnx-int8", "torch"],
        default="onnx",
        help="the fast configuration's embedder",
    )
    parser.add_argument(
        "--max-batch", type=int, default=64, help="the fast configuration's micro-batch bound"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="the fast configuration's micro-batch wait"
    )
    parser.add_argument(
        "--fast-cache",
        action="store_true",
        help="keep the fast server's vector and route caches on (default off)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="CONFIG:KEY=VALUE",
        help="extra config for one server, e.g. naive:server.max_text_chars=9000",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled JSONL directory")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="ONNX exports and the servers' data directories",
    )
    parser.add_argument("--fresh", action="store_true", help="empty the servers' data dirs first")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", choices=CONFIGS, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --serve, be one of its servers)."""
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(args))
        return 0
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/load.py needs psutil: pip install -e '.[bench]'") from None
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for data_dir in args.work_dir.glob("data-*"):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(data_dir)
    if not args.workers:
        return asyncio.run(run(args))
    if any(not 1 <= n <= 64 for n in args.workers):
        raise SystemExit("--workers: each N from 1 to 64")
    args.configs = [f"workers{n}" for n in args.workers]
    with scratch_schema(args.store_url, "tierguard_bench") as url:  # a cold store per run
        args.store_url = url
        return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
