"""Torch processes sharing the cores: torch's default threads against the thread policy.

    python benchmarks/cpu_threads.py [--rounds 3] [--seconds 3] [--clients 4] [--per-client 4] [--part all]

1. ``wait``: processes generating with the shapes model (64x64, 8 steps) in windows of ``--seconds``:
   alone, beside a busy non-torch process, and two side by side; ``OMP_WAIT_POLICY`` unset vs
   ``PASSIVE`` (libgomp reads it when torch loads, so each setting is its own process); threads = the
   machine's cores (torch's default) vs the policy (share 2). Reported: seconds per image (p50/p95)
   and images/s of the processes together.
2. ``agents``: two ``zimage-edge serve`` agents side by side, each fed ``--clients`` concurrent clients
   of ``--per-client`` requests, with ``ZIMAGE_CPU__THREADS`` = the cores (no policy) and with
   ``ZIMAGE_CPU__SHARE=2``. Reported: request latency p50/p95, images/s, and the ratio with/without.
Other people's processes share these cores: every process is started and warmed first, then the
runs are interleaved round by round (order alternating), so that a burst of outside load hits every
configuration alike; images/s is the median over rounds, latencies are pooled. The load average is
recorded. Results: ``benchmarks/results/cpu-threads.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from report import RESULTS, agent_process, write_results

from zimage_edge.cpu import CpuSettings, configure_threads
from zimage_edge.shapes import PRETRAINED

PROMPT = "a red circle on a blue background"
SIDE = 64
CORES = os.cpu_count() or 1
# A process that never starts or an agent that never warms up ends the run instead of hanging it.
START_TIMEOUT_S = 120.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def child() -> None:
    """A generating process: threads from ``ZIMAGE_CPU__*``, OMP_WAIT_POLICY as the parent set it.

    Reads ``go SECONDS`` lines and answers each with the per-image times of one window.
    """
    decision = configure_threads(CpuSettings())
    from zimage_edge.model.generate import generate
    from zimage_edge.model.loading import load_pipeline
    from zimage_edge.request import GenerationRequest

    pipe = load_pipeline(PRETRAINED).pipe
    seed = 0
    for seed in range(2):  # warm-up
        generate(pipe, GenerationRequest(prompt=PROMPT, width=SIDE, height=SIDE, seed=seed))
    print("ready", flush=True)
    for line in sys.stdin:
        seconds = float(line.split()[1])
        times: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            seed += 1
            t0 = time.perf_counter()
            generate(pipe, GenerationRequest(prompt=PROMPT, width=SIDE, height=SIDE, seed=seed))
            times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        print(json.dumps({"threads": decision.intra_op, "times": times, "wall": wall}), flush=True)


@dataclass
class Setup:
    """One configuration of the direct runs: its processes and what was measured in each round."""

    name: str
    processes: int
    env: dict[str, str]
    busy: bool = False
    children: list[subprocess.Popen[str]] = field(default_factory=list)
    threads: int = 0
    times: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.children = [
            subprocess.Popen(
                [sys.executable, __file__, "--child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=self.env,
            )
            for _ in range(self.processes)
        ]

    def wait_ready(self) -> None:
        for proc in self.children:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{self.name}: a child did not start: {line!r}")

    def run(self, seconds: float) -> None:
        """One window: every child generates for ``seconds`` at once (beside a spinner if ``busy``)."""
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if self.busy else None
        try:
            for proc in self.children:
                assert proc.stdin is not None
                proc.stdin.write(f"go {seconds}\n")
                proc.stdin.flush()
            results = []
            for proc in self.children:
                assert proc.stdout is not None
                results.append(json.loads(proc.stdout.readline()))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        self.threads = results[0]["threads"]
        self.times += [t for r in results for t in r["times"]]
        self.rates.append(sum(len(r["times"]) / r["wall"] for r in results))

    def stop(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def summary(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "threads": self.threads,
            "images": len(self.times),
            "p50_s": pct(self.times, 0.5),
            "p95_s": pct(self.times, 0.95),
            "images_per_sec": statistics.median(self.rates),
            "images_per_sec_rounds": self.rates,
        }


def wait_policy(rounds: int, seconds: float) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZIMAGE_CPU__", "OMP_"))}
    cores = {"ZIMAGE_CPU__THREADS": str(CORES)}
    share = {"ZIMAGE_CPU__SHARE": "2"}
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    setups = [
        Setup(f"alone, {CORES} threads, wait unset", 1, {**base, **cores}),
        Setup(f"alone, {CORES} threads, wait PASSIVE", 1, {**base, **cores, **passive}),
        Setup(f"beside a busy process, {CORES} threads, wait unset", 1, {**base, **cores}, busy=True),
        Setup(f"beside a busy process, {CORES} threads, wait PASSIVE", 1, {**base, **cores, **passive}, busy=True),
        Setup(f"2 side by side, {CORES} threads (default), wait unset", 2, {**base, **cores}),
        Setup(f"2 side by side, {CORES} threads (default), wait PASSIVE", 2, {**base, **cores, **passive}),
        Setup("2 side by side, policy (share 2), wait unset", 2, {**base, **share}),
        Setup("2 side by side, policy (share 2), wait PASSIVE", 2, {**base, **share, **passive}),
    ]
    try:
        for setup in setups:  # loaded one configuration at a time: loading is not what is measured
            setup.start()
            setup.wait_ready()
        for r in range(rounds):
            for setup in setups if r % 2 == 0 else reversed(setups):
                setup.run(seconds)
    finally:
        for setup in setups:
            setup.stop()
    return {setup.name: setup.summary() for setup in setups}


def agent(env: dict[str, str]) -> contextlib.AbstractAsyncContextManager[str]:
    """A ``zimage-edge serve`` process of the shapes model on a free port; yields its URL once warm."""
    return agent_process(str(PRETRAINED), env, START_TIMEOUT_S)


async def feed(session: aiohttp.ClientSession, base: str, clients: int, per_client: int, offset: int) -> list[float]:
    """``clients`` concurrent clients of ``per_client`` requests each; the latency of every request."""
    latencies: list[float] = []

    async def client(index: int) -> None:
        for i in range(per_client):
            body = {"prompt": PROMPT, "width": SIDE, "height": SIDE, "seed": offset + index * 1000 + i}
            t0 = time.perf_counter()
            async with session.post(f"{base}/v1/generate", json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


@dataclass
class AgentPair:
    name: str
    urls: tuple[str, str]
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, clients: int, per_client: int, offset: int) -> None:
        started = time.perf_counter()
        results = await asyncio.gather(*(feed(session, url, clients, per_client, offset) for url in self.urls))
        wall = time.perf_counter() - started
        self.latencies += [t for r in results for t in r]
        self.rates.append(sum(len(r) for r in results) / wall)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "p50_s": pct(self.latencies, 0.5),
            "p95_s": pct(self.latencies, 0.95),
            "images_per_sec": statistics.median(self.rates),
            "images_per_sec_rounds": self.rates,
        }


async def agents(rounds: int, clients: int, per_client: int) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ZIMAGE_", "OMP_"))}
    base |= {"ZIMAGE_CACHE__MAX_BYTES": "0", "ZIMAGE_LOG_LEVEL": "WARNING"}
    without_env = {**base, "ZIMAGE_CPU__THREADS": str(CORES)}
    with_env = {**base, "ZIMAGE_CPU__SHARE": "2"}
    async with contextlib.AsyncExitStack() as stack:
        # Started one after the other (loading is not measured); idle agents use no CPU.
        urls = [await stack.enter_async_context(agent(env)) for env in (without_env, without_env, with_env, with_env)]
        pairs = [AgentPair(f"without ({CORES} threads each)", (urls[0], urls[1])),
                 AgentPair("with (share 2)", (urls[2], urls[3]))]  # fmt: skip
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for pair in pairs:
            await pair.run(session, 1, 2, 10**6)  # warm-up
            pair.latencies.clear()
            pair.rates.clear()
        for r in range(rounds):
            for pair in pairs if r % 2 == 0 else reversed(pairs):
                await pair.run(session, clients, per_client, r * 10**4)
    without, with_policy = pairs[0].summary(), pairs[1].summary()
    return {
        "clients_per_agent": clients,
        "requests_per_client": per_client,
        "rounds": rounds,
        pairs[0].name: without,
        pairs[1].name: with_policy,
        "p50_ratio_with_over_without": with_policy["p50_s"] / without["p50_s"],
        "p95_ratio_with_over_without": with_policy["p95_s"] / without["p95_s"],
        "throughput_ratio_with_over_without": with_policy["images_per_sec"] / without["images_per_sec"],
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# CPU threads: torch processes sharing {CORES} cores (shapes model, 64x64, 8 steps)\n",
        "Load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}. ".format(
            *report["load_average_before"], *report["load_average_after"]
        )
        + f"{report['rounds']} interleaved rounds; images/s is the median over rounds.\n",
    ]
    if "wait" in report:
        lines += [
            "## Direct generation: OMP_WAIT_POLICY and threads\n",
            "| run | threads each | images | s/image p50 | p95 | images/s (all) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in report["wait"].items():
            lines.append(
                f"| {name} | {r['threads']} | {r['images']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} "
                f"| {r['images_per_sec']:.2f} |"
            )
        lines.append("")
    if "agents" in report:
        a = report["agents"]
        lines += [
            f"## Two agents, {a['clients_per_agent']} concurrent clients each, "
            f"{a['requests_per_client']} requests per client per round\n",
            "| run | requests | latency p50 | p95 | images/s (both) |",
            "|---|---|---|---|---|",
        ]
        for name, r in a.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {name} | {r['requests']} | {r['p50_s']:.3f} s | {r['p95_s']:.3f} s "
                    f"| {r['images_per_sec']:.2f} |"
                )
        lines.append(
            f"\nwith/without: p50 {a['p50_ratio_with_over_without']:.2f}x, "
            f"p95 {a['p95_ratio_with_over_without']:.2f}x, "
            f"images/s **{a['throughput_ratio_with_over_without']:.2f}x**\n"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "wait", "agents"), default="all")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--seconds", type=float, default=3.0, help="generation window of a direct run")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients per agent")
    parser.add_argument("--per-client", type=int, default=4, help="requests per client per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    # Other people's processes share these cores too: the load average says how much.
    report: dict[str, Any] = {"cores": CORES, "rounds": args.rounds, "load_average_before": os.getloadavg()}
    if args.part in ("all", "wait"):
        report["wait"] = wait_policy(args.rounds, args.seconds)
    if args.part in ("all", "agents"):
        report["agents"] = asyncio.run(agents(args.rounds, args.clients, args.per_client))
    report["load_average_after"] = os.getloadavg()
    write_results(args.out, "cpu-threads", report, render(report))


if __name__ == "__main__":
    main()
