"""Stream latency: what does CheckStream add to each chunk of a benign answer?

A client streams model-like answers through the bidirectional `CheckStream`
RPC and, in the same run, through an unchecked echo with the same message
types on the same server process (`/bench.Echo/Stream`: `release = chunk` for
every chunk, a last response with a verdict when the client closes), so that
the transport is the same and only the checking differs. Per chunk it measures
the time from sending the chunk to receiving the release that contains the
chunk's last character, at 1 and 32 concurrent streams, for each release mode:

- `stream_first` (the main number) and `audit` release each chunk once the
  detectors passed it;
- `hold_back` keeps the last `stream.overlap_chars` (128) characters until more
  text follows or the stream ends, so its chunks wait for later chunks by
  design. Its row counts each chunk's real wait (a chunk held until the end
  waits until the end); the `beyond hold` row subtracts the designed wait (the
  time from sending the chunk to sending the chunk, or the close, that makes
  it releasable), which leaves what the checking itself costs.

Streams: benign answers built at run time from the benign prompts of
sharegpt_user_prompts, arena_hard and self_instruct (../shared/datasets)
concatenated to 1,500-3,000 characters, cut into chunks of 20-40 characters
(about 4-8 tokens), one every `--chunk-interval-ms` (20 ms; 0: as fast as the
server takes them); the client closes its side right after the last chunk.
Each stream's context is one banking77 prompt that CheckPrompt allowed before
the run (as an application checks the prompt before it generates, so the
stream's start finds the prompt's route in the route cache); an answer that
the detectors stop, or whose releases differ from it, is dropped before
measuring (counted in the header).

The server is the production gateway (`Gateway.create` + `start_server`,
default config: ONNX embedder, caches on, local critic) in a subprocess with a
fresh data dir under a temp dir, the echo server beside it in the same event
loop. Variants run in short windows interleaved in time (`--rounds` rounds of
every variant in a shuffled order per concurrency level); at concurrency N,
N lanes run streams back to back, their starts spread over one stream's
length, and only streams started inside the window are counted (lanes keep
the load up until the last of them ends, then finish the streams they are in).

    python benchmarks/stream_latency.py                      # about 4 minutes
    python benchmarks/stream_latency.py --quick              # about 1 minute
    python benchmarks/stream_latency.py --chunk-interval-ms 0 --json stream.json

`+p50`/`+p99` are the checked variant's percentile less the unchecked one's
at the same concurrency (differences of percentiles, not percentiles of
differences); `ratio` is the median stream duration (start sent to last
response received) per chunk over the unchecked one (answers differ in
length).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import DEFAULT_DATA, DEFAULT_WORK_DIR, ROOT, ChildServer, announce_and_wait

from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.runtime.config import StreamConfig

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Stream"
MODES = {
    "hold_back": pb.STREAM_MODE_HOLD_BACK,
    "stream_first": pb.STREAM_MODE_STREAM_FIRST,
    "audit": pb.STREAM_MODE_AUDIT,
}
VARIANTS = ("unchecked", *MODES)
ANSWER_SOURCES = ("sharegpt_user_prompts", "arena_hard", "self_instruct")
ANSWER_CHARS = (1500, 3000)
CHUNK_CHARS = (20, 40)
OVERLAP_CHARS = StreamConfig().overlap_chars  # the server runs the default config
STREAM_TIMEOUT_S = 120.0


# -- the server side (a subprocess: `stream_latency.py --serve-data DIR`) ------------------


async def _echo(requests: Any, context: Any) -> Any:
    """The unchecked stream: every chunk released as it arrives, then a last response."""
    async for request in requests:
        if request.WhichOneof("event") == "chunk":
            yield pb.CheckStreamResponse(release=request.chunk)
    yield pb.CheckStreamResponse(verdict=pb.Verdict(decision=pb.DECISION_ALLOW))


async def serve(args: argparse.Namespace) -> None:
    """Start the production gateway and the echo server; print both ports; serve until told."""
    import logging

    from gateway.api.server import start_server
    from gateway.runtime.app import Gateway
    from gateway.runtime.config import load_config

    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {
        "data_dir": str(args.serve_data),
        "embedding.models_dir": str(args.work_dir / "models"),  # ONNX export kept between runs
        "server.host": "127.0.0.1",
        "server.port": 0,
    }
    config = load_config(None, environ={}, overrides=overrides)
    gateway = Gateway.create(config, environ={})  # default config: ONNX, caches on, local critic
    running = await start_server(gateway, port=0)
    echo = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        _echo,
        request_deserializer=pb.CheckStreamRequest.FromString,
        response_serializer=pb.CheckStreamResponse.SerializeToString,
    )
    echo.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Stream": handler}),)
    )
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    await announce_and_wait(running.port, echo_port)
    await echo.stop(0)
    await running.stop(grace_seconds=0)


class ServerProcess(ChildServer):
    """The gateway and the echo in a subprocess, with its CPU time."""

    def __init__(self, data_dir: Path, args: argparse.Namespace) -> None:
        super().__init__(
            __file__, ["--serve-data", str(data_dir), "--work-dir", str(args.work_dir)]
        )
        self.gateway_port, self.echo_port = self.ports


# -- streams ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A benign answer and the chunks it is streamed in."""

    text: str
    chunks: tuple[str, ...]
    ends: tuple[int, ...]  # characters sent after each chunk
    releasable_by: tuple[int, ...]  # hold_back: the chunk whose arrival releases each chunk


def _answer(text: str, rng: random.Random) -> Answer:
    chunks, at = [], 0
    while at < len(text):
        size = rng.randint(*CHUNK_CHARS)
        chunks.append(text[at : at + size])
        at += size
    ends = tuple(itertools.accumulate(len(c) for c in chunks))
    # hold_back releases up to (characters received - overlap): chunk i's last character
    # goes out with the first chunk j whose end is overlap past it, else at the close (n).
    releasable_by = tuple(
        next((j for j in range(i, len(ends)) if ends[j] - OVERLAP_CHARS >= end), len(ends))
        for i, end in enumerate(ends)
    )
    return Answer(text, tuple(chunks), ends, releasable_by)


def build_answers(data_dir: Path, count: int, rng: random.Random) -> list[Answer]:
    """Benign prompts' texts concatenated to 1,500-3,000 characters, cut into chunks."""
    from router.evaluation import read_labelled

    texts = [
        r.text.strip()
        for name in ANSWER_SOURCES
        for r in read_labelled(data_dir / f"{name}.jsonl")
        if r.label == "benign" and r.text.strip()
    ]
    if not texts:
        raise SystemExit(f"no benign texts in {data_dir}: point --data at ../shared/datasets")
    rng.shuffle(texts)
    pool = itertools.cycle(texts)
    answers = []
    for _ in range(count):
        target = rng.randint(*ANSWER_CHARS)
        parts: list[str] = []
        size = 0
        while size < ANSWER_CHARS[0] or (size < target and size + 40 < ANSWER_CHARS[1]):
            text = next(pool)
            if size + len(text) + 2 > ANSWER_CHARS[1]:
                if len(text) > ANSWER_CHARS[1] // 2:
                    continue  # too long to fit any answer: take the next
                if size >= ANSWER_CHARS[0]:
                    break
                continue
            parts.append(text)
            size += len(text) + 2
        answers.append(_answer("\n\n".join(parts), rng))
    return answers


def _revision() -> str:
    """The commit the server's code is at, `+modified` when its packages differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        packages = ["router", "critic", "embeddings_index", "gateway"]
        clean = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", *packages]).returncode == 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head if clean else f"{head}+modified"


def load_prompts(data_dir: Path) -> list[str]:
    """Context prompts: the banking77 queries."""
    from router.evaluation import read_labelled

    path = data_dir / "banking77.jsonl"
    texts = [r.text for r in read_labelled(path) if r.label == "benign" and r.text.strip()]
    if not texts:
        raise SystemExit(f"no benign prompts in {path}: point --data at ../shared/datasets")
    return texts


@dataclass
class StreamRecord:
    """One stream as the client saw it (seconds)."""

    variant: str
    latency: list[float]  # per chunk: sent -> the release holding its last character
    beyond_hold: list[float]  # the same less the designed hold (hold_back; else equal)
    duration: float  # start sent -> last response received
    closing: float  # the client's close -> the last response (the verdict) received
    chunks: int
    ok: bool  # ended normally, not stopped, releases == the answer
    detail: str = ""  # why not ok
    escalated: bool = False


Opener = Callable[[], Any]  # a new stream-stream call


async def one_stream(
    open_call: Opener, variant: str, answer: Answer, prompt: str, interval: float
) -> StreamRecord:
    """Stream `answer` at the pace `interval`, with `prompt` as context; time every chunk."""
    n = len(answer.chunks)
    sent = [math.nan] * n
    latency = [math.nan] * n
    parts: list[str] = []
    start = pb.CheckStreamRequest(
        start=pb.StreamStart(
            policy="",
            context=[pb.Message(role=pb.ROLE_USER, content=prompt)],
            mode=MODES.get(variant, pb.STREAM_MODE_UNSPECIFIED),
        )
    )

    async def read() -> pb.CheckStreamResponse | None:
        released, k, last = 0, 0, None
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return last
            now = time.perf_counter()
            if response.release:
                parts.append(response.release)
                released += len(response.release)
                while k < n and answer.ends[k] <= released:
                    latency[k] = now - sent[k]
                    k += 1
            if response.HasField("verdict"):
                last = response

    call = open_call()
    t0 = time.perf_counter()
    reader = asyncio.create_task(read())
    try:
        await call.write(start)
        for i, chunk in enumerate(answer.chunks):
            delay = t0 + (i + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[i] = time.perf_counter()
            await call.write(pb.CheckStreamRequest(chunk=chunk))
        closed = time.perf_counter()
        await call.done_writing()
        last = await reader
        done = time.perf_counter()
    except asyncio.CancelledError:
        call.cancel()
        reader.cancel()
        raise
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        reader.cancel()
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        return StreamRecord(variant, [], [], math.nan, math.nan, n, False, f"error {code}")
    if variant == "hold_back":
        releasable = [
            closed if j >= n else sent[j] for j in answer.releasable_by
        ]  # when the rule lets each chunk go
        beyond = [s + lat - r for s, lat, r in zip(sent, latency, releasable, strict=True)]
    else:
        beyond = list(latency)
    if last is None:
        detail = "no last response"
    elif last.stopped:
        detail = "stopped: " + last.verdict.reason
    elif "".join(parts) != answer.text:
        detail = "releases differ from the answer"
    else:
        detail = ""
    return StreamRecord(
        variant, latency, beyond, done - t0, done - closed, n, not detail, detail,
        escalated=bool(last is not None and last.verdict.escalated),
    )  # fmt: skip


# -- windows ---------------------------------------------------------------------------


@dataclass
class Window:
    """One variant at one concurrency for `--window` seconds."""

    recording: bool = False
    closed: bool = False
    stop: bool = False
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    records: list[StreamRecord] = field(default_factory=list)


class Streams:
    """What every window draws from: answers and context prompts in a fixed rotation."""

    def __init__(self, answers: Sequence[Answer], prompts: Sequence[str], seed: int) -> None:
        self.answers = itertools.cycle(answers)
        self.prompts = itertools.cycle(prompts)
        self.rng = random.Random(seed)


async def run_window(
    open_call: Opener,
    variant: str,
    concurrency: int,
    streams: Streams,
    server: ServerProcess,
    args: argparse.Namespace,
    stream_seconds: float,
) -> tuple[list[StreamRecord], dict[str, float]]:
    """Lanes streaming back to back: the streams started in the window, and its clocks."""
    window = Window()
    interval = args.chunk_interval_ms / 1000
    ramp = stream_seconds if concurrency > 1 else 0.0

    async def lane(stagger: float) -> None:
        await asyncio.sleep(stagger)
        while not window.stop:
            recorded = window.recording
            window.in_flight += recorded
            try:
                record = await one_stream(
                    open_call, variant, next(streams.answers), next(streams.prompts), interval
                )
            finally:
                window.in_flight -= recorded
                if recorded and window.closed and window.in_flight == 0:
                    window.drained.set()
            if recorded:
                window.records.append(record)

    lanes = [
        asyncio.create_task(lane(streams.rng.uniform(0, ramp) if i else 0.0))
        for i in range(concurrency)
    ]
    await asyncio.sleep(ramp)
    cpu0, t0, client0 = server.cpu_seconds(), time.perf_counter(), _client_cpu()
    window.recording = True
    await asyncio.sleep(args.window)
    window.recording = False
    window.closed = True
    if window.in_flight:
        await window.drained.wait()
    clocks = {
        "server_cpu": server.cpu_seconds() - cpu0,
        "client_cpu": _client_cpu() - client0,
        "wall": time.perf_counter() - t0,
        "load": os.getloadavg()[0],  # the machine's (others' work too), after the window
    }
    # The lanes finish the streams they are in (unrecorded): a client that cancels a stream
    # is not what is measured, and makes the gateway log an error (opentelemetry's
    # server interceptor detaching its context in another Context; log-only).
    window.stop = True
    await asyncio.gather(*lanes)
    return window.records, clocks


def _client_cpu() -> float:
    times = os.times()
    return times.user + times.system


# -- results ---------------------------------------------------------------------------


@dataclass
class Row:
    """One variant at one concurrency, over every round (milliseconds)."""

    concurrency: int
    variant: str  # unchecked, stream_first, audit, hold_back, hold_back beyond hold
    streams: int
    chunks: int
    bad_streams: int
    p50_ms: float
    p99_ms: float
    added_p50_ms: float | None
    added_p99_ms: float | None
    first_chunk_p50_ms: float
    end_p50_ms: float  # the client's close -> the verdict
    end_p99_ms: float
    stream_p50_s: float
    duration_ratio: float | None
    server_cpu_cores: float
    client_cpu_cores: float
    loadavg_1m: float  # the machine's, the mean after this variant's windows
    escalated_streams: int
    problems: dict[str, int] = field(default_factory=dict)


def _rows(
    concurrency: int,
    records: dict[str, list[StreamRecord]],
    clocks: dict[str, list[dict[str, float]]],
) -> list[Row]:
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else math.nan

    good = {v: [r for r in records[v] if r.ok] for v in records}
    base = good["unchecked"]
    base_lat = [x for r in base for x in r.latency]
    base_p50, base_p99 = pct(base_lat, 50), pct(base_lat, 99)
    # Answers differ in length and each variant streams its own: compare durations per chunk.
    base_per_chunk = float(np.median([r.duration / r.chunks for r in base])) if base else math.nan
    rows = []
    order = [("unchecked", False), ("stream_first", False), ("audit", False)]
    order += [("hold_back", False), ("hold_back", True)]
    for variant, beyond in order:
        if variant not in records:
            continue
        ok = good[variant]
        lat = [x for r in ok for x in (r.beyond_hold if beyond else r.latency)]
        first = [(r.beyond_hold if beyond else r.latency)[0] for r in ok]
        problems: dict[str, int] = {}
        for r in records[variant]:
            if not r.ok:
                key = r.detail.split(":")[0]
                problems[key] = problems.get(key, 0) + 1
        dur = float(np.median([r.duration for r in ok])) if ok else math.nan
        per_chunk = float(np.median([r.duration / r.chunks for r in ok])) if ok else math.nan
        checked = variant != "unchecked"
        wall = sum(c["wall"] for c in clocks[variant])
        rows.append(
            Row(
                concurrency=concurrency,
                variant=f"{variant} beyond hold" if beyond else variant,
                streams=len(ok),
                chunks=len(lat),
                bad_streams=len(records[variant]) - len(ok),
                p50_ms=pct(lat, 50),
                p99_ms=pct(lat, 99),
                added_p50_ms=pct(lat, 50) - base_p50 if checked else None,
                added_p99_ms=pct(lat, 99) - base_p99 if checked else None,
                first_chunk_p50_ms=pct(first, 50),
                end_p50_ms=pct([r.closing for r in ok], 50),
                end_p99_ms=pct([r.closing for r in ok], 99),
                stream_p50_s=dur,
                duration_ratio=per_chunk / base_per_chunk if checked else None,
                server_cpu_cores=sum(c["server_cpu"] for c in clocks[variant]) / wall,
                client_cpu_cores=sum(c["client_cpu"] for c in clocks[variant]) / wall,
                loadavg_1m=float(np.mean([c["load"] for c in clocks[variant]])),
                escalated_streams=sum(r.escalated for r in ok),
                problems=problems,
            )
        )
    return rows


_HEADER = (
    f"{'c':>3} {'variant':<23} {'streams':>7} {'chunks':>7} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'+p50 ms':>7} {'+p99 ms':>7} {'1st ms':>7} {'end p50':>7} {'end p99':>7} {'ratio':>6} {'srv cpu':>7} "
    f"{'cli cpu':>7} {'load':>5} {'bad':>4}"
)


_LEGEND = """\
p50/p99: per chunk, from sending it to receiving the release with its last character;
  hold_back: with the designed hold (a chunk released at the end counts until the end);
  hold_back beyond hold: less that hold (timed from when the {overlap}-character rule let it go).
+p50/+p99: checked less unchecked at the same concurrency; 1st ms: the first chunk's p50;
end p50/p99: from the client's close to the last response (the verdict; hold_back's tail);
ratio: the median stream duration (per chunk) over the unchecked one;
srv cpu, cli cpu: cores the server and this client kept busy in the windows;
load: the machine's 1-minute load average (2 cores: above 2, others compete);
bad: streams that failed, were stopped, or whose releases differ from the answer."""


def _row(r: Row) -> str:
    def opt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"{r.concurrency:>3} {r.variant:<23} {r.streams:>7} {r.chunks:>7} {r.p50_ms:>7.2f} "
        f"{r.p99_ms:>7.2f} {opt(r.added_p50_ms, '>+7.2f'):>7} {opt(r.added_p99_ms, '>+7.2f'):>7} "
        f"{r.first_chunk_p50_ms:>7.2f} {r.end_p50_ms:>7.2f} {r.end_p99_ms:>7.2f} "
        f"{opt(r.duration_ratio, '>6.3f'):>6} "
        f"{r.server_cpu_cores:>7.2f} {r.client_cpu_cores:>7.2f} {r.loadavg_1m:>5.1f} "
        f"{r.bad_streams:>4}"
    )


# -- the run ---------------------------------------------------------------------------


async def _allowed_prompts(
    stub: pb_grpc.GuardrailServiceStub, prompts: Sequence[str], count: int
) -> list[str]:
    """The first `count` prompts CheckPrompt allows without escalating (their routes cached)."""
    allowed: list[str] = []
    queue = iter(prompts)

    async def worker() -> None:
        for text in queue:
            if len(allowed) >= count:
                return
            reply = await stub.CheckPrompt(pb.CheckPromptRequest(text=text), timeout=30)
            if reply.verdict.decision == pb.DECISION_ALLOW and not reply.verdict.escalated:
                allowed.append(text)

    await asyncio.gather(*(worker() for _ in range(8)))
    return allowed[:count]


async def _benign_answers(
    open_call: Opener, answers: Sequence[Answer], prompt: str
) -> tuple[list[Answer], list[str]]:
    """The answers the gateway passes whole (stream_first, no pacing); the reasons for the rest."""
    kept: list[Answer] = []
    dropped: list[str] = []
    gate = asyncio.Semaphore(4)

    async def one(answer: Answer) -> None:
        async with gate:
            record = await one_stream(open_call, "stream_first", answer, prompt, 0.0)
        if record.ok:
            kept.append(answer)
        else:
            dropped.append(record.detail)

    await asyncio.gather(*(one(a) for a in answers))
    kept.sort(key=answers.index)
    return kept, dropped


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    answers = build_answers(args.data, args.answers, rng)
    prompts = load_prompts(args.data)
    rng.shuffle(prompts)
    results: list[Row] = []
    revision = _revision()
    with tempfile.TemporaryDirectory(prefix="stream-latency-") as tmp:
        server = ServerProcess(Path(tmp) / "data", args)
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{server.gateway_port}") as gateway_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.echo_port}") as echo_channel,
            ):
                stub = pb_grpc.GuardrailServiceStub(gateway_channel)
                echo = echo_channel.stream_stream(
                    ECHO_METHOD,
                    request_serializer=pb.CheckStreamRequest.SerializeToString,
                    response_deserializer=pb.CheckStreamResponse.FromString,
                )
                openers: dict[str, Opener] = {
                    v: (lambda: stub.CheckStream(timeout=STREAM_TIMEOUT_S))
                    for v in MODES  # the same call for every mode: the mode is in `start`
                }
                openers["unchecked"] = lambda: echo(timeout=STREAM_TIMEOUT_S)
                context = await _allowed_prompts(stub, prompts, args.prompts)
                if not context:
                    raise SystemExit("CheckPrompt allowed none of the banking77 prompts")
                kept, dropped = await _benign_answers(openers["stream_first"], answers, context[0])
                if not kept:
                    raise SystemExit(f"every answer was stopped or altered: {dropped[:3]}")
                for _ in range(3):  # warm the echo path too
                    await one_stream(openers["unchecked"], "unchecked", kept[0], context[0], 0.0)
                chunks = [len(a.chunks) for a in kept]
                chars = [len(a.text) for a in kept]
                stream_seconds = float(np.mean(chunks)) * args.chunk_interval_ms / 1000
                print(
                    f"code {revision}; {len(kept)} answers ({len(dropped)} dropped: stopped or altered), "
                    f"{min(chars):,}-{max(chars):,} characters, {int(np.mean(chunks))} chunks "
                    f"of {CHUNK_CHARS[0]}-{CHUNK_CHARS[1]} on average, one every "
                    f"{args.chunk_interval_ms:g} ms; {len(context)} banking77 context prompts "
                    f"(allowed by CheckPrompt first); {args.rounds} round(s) x {args.window:g} s "
                    f"per variant and concurrency; hold_back overlap {OVERLAP_CHARS} characters",
                    flush=True,
                )
                for reason in sorted(set(dropped)):
                    print(f"  dropped {dropped.count(reason)}: {reason[:150]}", flush=True)
                print(_HEADER + "\n" + "-" * len(_HEADER), flush=True)
                streams = Streams(kept, context, args.seed)
                for concurrency in args.concurrency:
                    records: dict[str, list[StreamRecord]] = {v: [] for v in args.variants}
                    clocks: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
                    for _ in range(args.rounds):
                        order = list(args.variants)
                        streams.rng.shuffle(order)
                        for variant in order:
                            got, clock = await run_window(
                                openers[variant], variant, concurrency, streams, server, args,
                                stream_seconds,
                            )  # fmt: skip
                            records[variant] += got
                            clocks[variant].append(clock)
                    rows = _rows(concurrency, records, clocks)
                    results += rows
                    for row in rows:
                        print(_row(row), flush=True)
        finally:
            server.stop()
    print("\n" + _LEGEND.format(overlap=OVERLAP_CHARS))
    for row in results:
        if row.problems or row.escalated_streams:
            print(
                f"  c={row.concurrency} {row.variant}: problems {row.problems}, "
                f"escalated {row.escalated_streams}"
            )
    if args.json:
        doc = {
            "meta": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "argv": sys.argv[1:],
                "revision": revision,
                "answers": len(kept),
                "answers_dropped": dropped,
                "chunk_interval_ms": args.chunk_interval_ms,
                "overlap_chars": OVERLAP_CHARS,
                "loadavg_1m": os.getloadavg()[0],
            },
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s windows, 16 answers")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="concurrent streams"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT",
        help="unchecked (always run), hold_back, stream_first, audit",
    )  # fmt: skip
    parser.add_argument(
        "--chunk-interval-ms", type=float, default=20.0, help="pace of the chunks (0: no pause)"
    )
    parser.add_argument("--rounds", type=int, help="rounds of every variant (default 3)")
    parser.add_argument("--window", type=float, help="seconds per window (default 6)")
    parser.add_argument("--answers", type=int, help="answers built (default 64)")
    parser.add_argument("--prompts", type=int, default=300, help="context prompts")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled JSONL directory")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="ONNX exports (kept between runs)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve-data", type=Path, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args(argv)
    if "unchecked" not in args.variants:
        args.variants.insert(0, "unchecked")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.window = args.window or (3.0 if args.quick else 6.0)
    args.answers = args.answers or (16 if args.quick else 64)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --serve-data, be its server)."""
    args = parse_args(argv)
    if args.serve_data is not None:
        asyncio.run(serve(args))
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
