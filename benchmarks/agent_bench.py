"""The agent's own overhead (no-op model, one core) and its load curve on a real model.

    python benchmarks/agent_bench.py [--model DIR] [--requests 2000] [--concurrency 1,2,4,8] [...]

The same as ``zimage-edge bench agent`` (``edge_agent/bench.py``; every option of it applies), with
the results in ``benchmarks/results/agent-overhead.{json,md,png}`` and ``agent-load.{json,md,png}``
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from report import RESULTS

from edge_agent import bench_cli
from zimage_edge.cpu import CpuSettings, configure_threads


def main() -> int:
    parser = argparse.ArgumentParser(prog="agent_bench.py")
    bench_cli.register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["agent", "--out", str(RESULTS), *sys.argv[1:]])
    configure_threads(CpuSettings())  # before torch loads, as the command does
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
