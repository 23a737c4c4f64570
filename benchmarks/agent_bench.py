"""Agent overhead and micro-batching gain, measured in one run on the same model.

    python benchmarks/agent_bench.py [--model DIR] [--requests 200] [--size 64] [--batch-size 128]

1. Overhead: the same request through the HTTP API (native JSON, cache off, no batching window)
   against calling the generation function directly, one at a time. Reported: p50/p99 of both and
   of the difference. Target: p50 overhead <= 2 ms. The agent runs as its own ``zimage-edge serve``
   process, as deployed: torch's OpenMP workers of one thread slow down a second thread computing in
   the same process on small machines, which would charge the agent for the benchmark's own calls.
2. Batching: 8 concurrent clients against an agent with max_batch 8, then with max_batch 1.
   Reported: images/s of both and the gain. Target: >= 1.5x.
Without ``--model`` the tiny toy model is built. Results: ``benchmarks/results/agent.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from report import RESULTS, agent_process, write_results

from zimage_edge.model.generate import generate
from zimage_edge.model.loading import load_pipeline
from zimage_edge.request import GenerationRequest

CONCURRENCY = 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def agent(model: str, **env: str) -> contextlib.AbstractAsyncContextManager[str]:
    """A ``zimage-edge serve`` process on a free loopback port; yields its base URL once warm."""
    settings = {"ZIMAGE_CACHE__MAX_BYTES": "0", "ZIMAGE_LOG_LEVEL": "WARNING", **env}
    return agent_process(model, {**os.environ, **settings})


async def overhead(model: str, count: int, size: int) -> dict[str, Any]:
    body = {"prompt": "a red circle on a blue background", "width": size, "height": size, "steps": 1, "seed": 1}
    loaded = load_pipeline(model)
    request = GenerationRequest(**body)
    for _ in range(5):
        generate(loaded.pipe, request)  # warm-up
    direct = []
    for _ in range(count):
        started = time.perf_counter()
        generate(loaded.pipe, request)
        direct.append(time.perf_counter() - started)

    agent_times = []
    env = {"ZIMAGE_QUEUE__BATCH_WINDOW_MS": "0", "ZIMAGE_QUEUE__MAX_BATCH": "1"}
    async with agent(model, **env) as base, aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(f"{base}/v1/generate", json=body) as response:
                await response.read()
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(f"{base}/v1/generate", json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()
            agent_times.append(time.perf_counter() - started)
    ms = 1000.0
    return {
        "requests": count,
        "size": size,
        "direct_p50_ms": pct(direct, 0.5) * ms,
        "direct_p99_ms": pct(direct, 0.99) * ms,
        "agent_p50_ms": pct(agent_times, 0.5) * ms,
        "agent_p99_ms": pct(agent_times, 0.99) * ms,
        "overhead_p50_ms": (pct(agent_times, 0.5) - pct(direct, 0.5)) * ms,
        "overhead_p99_ms": (pct(agent_times, 0.99) - pct(direct, 0.99)) * ms,
        "overhead_mean_ms": (statistics.fmean(agent_times) - statistics.fmean(direct)) * ms,
    }


async def throughput(model: str, max_batch: int, size: int, per_client: int) -> float:
    env = {"ZIMAGE_QUEUE__BATCH_WINDOW_MS": "5", "ZIMAGE_QUEUE__MAX_BATCH": str(max_batch),
           "ZIMAGE_QUEUE__MAX_PENDING": "64"}  # fmt: skip
    async with agent(model, **env) as base, aiohttp.ClientSession() as session:

        async def client(index: int) -> int:
            done = 0
            for i in range(per_client):
                body = {"prompt": f"shape {index}", "width": size, "height": size, "seed": index * 1000 + i}
                async with session.post(f"{base}/v1/generate", json=body) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                done += 1
            return done

        await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))  # warm-up round
        started = time.perf_counter()
        images = sum(await asyncio.gather(*(client(i) for i in range(CONCURRENCY))))
        return images / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace, model: str) -> dict[str, Any]:
    over = await overhead(model, args.requests, args.size)
    batched = await throughput(model, CONCURRENCY, args.batch_size, args.per_client)
    single = await throughput(model, 1, args.batch_size, args.per_client)
    return {
        "overhead": over,
        "batching": {
            "concurrency": CONCURRENCY,
            "size": args.batch_size,
            "images_per_sec_max_batch_8": batched,
            "images_per_sec_max_batch_1": single,
            "gain": batched / single,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers directory or artifact (default: a fresh tiny toy model)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests for the overhead")
    parser.add_argument("--size", type=int, default=64, help="side of the overhead requests (1 step)")
    parser.add_argument("--batch-size", type=int, default=128, help="side of the throughput requests (8 steps)")
    parser.add_argument("--per-client", type=int, default=6, help="requests per client in the throughput runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from zimage_edge.model.toy import save_toy_model

            model = str(save_toy_model(Path(tmp) / "tiny"))
        report = asyncio.run(main_async(args, model))
    o, b = report["overhead"], report["batching"]
    text = (
        "# Edge agent: overhead and micro-batching (tiny model, CPU)\n\n"
        "| measure | value |\n|---|---|\n"
        f"| direct generate p50 / p99 | {o['direct_p50_ms']:.2f} / {o['direct_p99_ms']:.2f} ms |\n"
        f"| through the agent p50 / p99 | {o['agent_p50_ms']:.2f} / {o['agent_p99_ms']:.2f} ms |\n"
        f"| agent overhead p50 / p99 | **{o['overhead_p50_ms']:.2f}** / {o['overhead_p99_ms']:.2f} ms "
        f"(target p50 <= 2 ms) |\n"
        f"| images/s at concurrency 8, max_batch 8 | {b['images_per_sec_max_batch_8']:.2f} |\n"
        f"| images/s at concurrency 8, max_batch 1 | {b['images_per_sec_max_batch_1']:.2f} |\n"
        f"| batching gain | **{b['gain']:.2f}x** (target >= 1.5x) |\n"
    )
    write_results(args.out, "agent", report, text)


if __name__ == "__main__":
    main()
