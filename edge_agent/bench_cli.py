"""``zimage-edge bench agent``: the agent's own overhead (no-op model) and its load curve (real model).

    zimage-edge bench agent [--model DIR] [--requests 2000] [--concurrency 1,2,4,8] [--out DIR]
                            [--overhead-only | --load-only] [--agent-cpu N] [--client-cpu N]

Writes ``agent-overhead.{json,md,png}`` and ``agent-load.{json,md,png}`` (``edge_agent.bench``).
Importing this module is light: the handler imports the benchmark, aiohttp's client and the model stack.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zimage_edge.errors import UsageError

DEFAULT_OUT = Path("out/bench")


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` as a tuple of positive integers, or a ``UsageError``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--concurrency must be comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--concurrency must be integers of at least 1, not {text!r}")
    return values


def _cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from edge_agent.bench import (
        LoadConfig,
        OverheadConfig,
        load_benchmark,
        overhead_benchmark,
        write_load,
        write_overhead,
    )

    if args.overhead_only and args.load_only:
        raise UsageError("--overhead-only and --load-only exclude each other")
    for name in ("requests", "load_requests", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    levels = parse_levels(args.concurrency)
    out = Path(args.out)
    written = []
    if not args.load_only:
        overhead = OverheadConfig(
            model=f"noop:{args.size}",
            requests=args.requests,
            warmup=args.warmup,
            concurrency=levels,
            size=args.size,
            agent_cpu=args.agent_cpu,
            client_cpu=args.client_cpu,
            floor=not args.no_floor,
        )
        report = asyncio.run(overhead_benchmark(overhead))
        written += write_overhead(out, report)
        s = report["sequential"]
        verdict = "met" if report["target_met"] else "not met"
        print(
            f"agent overhead (no-op model, one core): p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, "
            f"{s['requests_per_sec']:.0f} requests/s; target p50 <= {report['target_p50_ms']:g} ms {verdict}"
        )
    if not args.overhead_only:
        load = LoadConfig(
            model=args.model,
            concurrency=levels,
            requests=args.load_requests,
            direct_requests=args.load_requests,
            size=args.size,
            steps=args.steps,
            max_batch=args.max_batch,
        )
        report = load_benchmark(load)
        written += write_load(out, report)
        for row in report["concurrency"]:
            print(
                f"concurrency {row['concurrency']}: {row['images_per_sec']:.2f} images/s, "
                f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
            )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``agent`` to the ``bench`` group's subcommands."""
    agent = bench_sub.add_parser(
        "agent", help="the agent's own overhead (no-op model, one core) and its load curve on a real model"
    )
    agent.add_argument("--model", help="model of the load benchmark (default: the shipped shapes model)")
    agent.add_argument(
        "--requests", type=int, default=2000, help="overhead: sequential requests, and per level (default 2000)"
    )
    agent.add_argument("--warmup", type=int, default=200, help="overhead: warm-up requests (default 200)")
    agent.add_argument("--load-requests", type=int, default=48, help="load: requests per level (default 48)")
    agent.add_argument("--concurrency", default="1,2,4,8", help="concurrent clients, comma-separated (default 1,2,4,8)")
    agent.add_argument("--size", type=int, default=64, help="image side of every request (default 64)")
    agent.add_argument("--steps", type=int, default=8, help="load: denoising steps (default 8)")
    agent.add_argument("--max-batch", type=int, help="load: the agent's max_batch (default: the highest level)")
    agent.add_argument("--agent-cpu", type=int, help="overhead: the core the agent runs on (default: the first)")
    agent.add_argument("--client-cpu", type=int, help="overhead: the client's core (default: another one)")
    agent.add_argument("--no-floor", action="store_true", help="overhead: skip the bare-aiohttp floor")
    agent.add_argument("--overhead-only", action="store_true", help="only the no-op overhead benchmark")
    agent.add_argument("--load-only", action="store_true", help="only the load benchmark on a real model")
    agent.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the results go (default {DEFAULT_OUT})")
    agent.set_defaults(handler=_cmd_agent, uses_torch=True)
