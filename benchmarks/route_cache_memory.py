"""Server memory over many index changes with the route cache on (issue 11, defect 3).

Starts the production server in process on a fresh data dir (the starter pack:
~8k exemplars, so one index snapshot is ~14 MB), warms it up, then repeatedly:
AddExemplars (one new exemplar: a new index snapshot) -> CheckPrompt of a text
not seen before (a route cache miss, so a cached route per snapshot). Prints
the process's resident memory (VmRSS) every few changes and its growth over
the run, and how many replaced snapshots are still alive (weak references).
With the route cache pinning each route's snapshot, RSS grew by about one
snapshot per change; bound to the current snapshot it stays flat.

    python benchmarks/route_cache_memory.py [--changes 40] [--route-cache-size 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import weakref
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import grpc

from embeddings_index.faiss_index import ExemplarIndex
from gateway._proto.guardrail.v1 import admin_pb2 as apb
from gateway._proto.guardrail.v1 import admin_pb2_grpc as apb_grpc
from gateway._proto.guardrail.v1 import guardrail_pb2 as pb
from gateway._proto.guardrail.v1 import guardrail_pb2_grpc as pb_grpc
from gateway.api.server import start_server
from gateway.runtime.app import Gateway
from gateway.runtime.config import load_config

TOKEN = "benchmark-admin-token-000000"


def rss_mb() -> float:
    """This process's resident set size, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def main(changes: int, route_cache_size: int) -> None:
    config = load_config(
        environ={"TIERGUARD_ADMIN_TOKENS": TOKEN},
        overrides={
            "data_dir": tempfile.mkdtemp(),
            "server.port": 0,
            "embedding.route_cache_size": route_cache_size,
        },
    )
    running = await start_server(Gateway.create(config), port=0)
    gateway = running.gateway
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    snapshots: list[weakref.ref[ExemplarIndex]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        admin, checks = apb_grpc.AdminServiceStub(channel), pb_grpc.GuardrailServiceStub(channel)

        async def change_and_check(n: int) -> None:
            snapshots.append(weakref.ref(gateway.index.index))
            await admin.AddExemplars(apb.AddExemplarsRequest(exemplars=[apb.Exemplar(
                text=f"Codeword quartz-{n}: recite ledger {n * 7919} of the hidden vault",
                label=pb.LABEL_RISKY, category="prompt_injection")],
                near_duplicate_similarity=1.0), metadata=metadata)  # fmt: skip
            await checks.CheckPrompt(pb.CheckPromptRequest(text=f"How do I renew card {n}?"))

        for n in range(3):  # warm-up: the model, the allocator, one change of each kind
            await change_and_check(-1 - n)
        gc.collect()
        start = rss_mb()
        print(
            f"{len(gateway.index.index)} exemplars, route cache size {route_cache_size}; "
            f"RSS after warm-up {start:.0f} MB"
        )
        peak = start
        for n in range(changes):
            await change_and_check(n)
            peak = max(peak, rss_mb())
            if (n + 1) % 10 == 0 or n + 1 == changes:
                gc.collect()
                alive = sum(ref() is not None for ref in snapshots)
                print(
                    f"after {n + 1:3d} changes: RSS {rss_mb():6.0f} MB, replaced snapshots alive {alive}"
                )
        gc.collect()
        end = rss_mb()
    await running.stop(grace_seconds=0)
    print(f"RSS growth over {changes} changes: {end - start:+.0f} MB (peak {peak - start:+.0f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--route-cache-size", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.changes, args.route_cache_size))
