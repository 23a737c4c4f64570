"""The fleet at scale: 1,000 simulated nodes, one Mosquitto, one controller (``fleet/bench.py``).

    python benchmarks/fleet_scale.py [--nodes 1000] [--duration 180] [--processes 4] [--artifacts DIR...]

``zimage-edge bench fleet`` writing into ``benchmarks/results/``: telemetry at one message per node per
second for the duration (ingest rate, loss (must be 0), duplicates, the controller's CPU and RSS, ack
latency), then the time for a rollout to every node to converge (downloads excluded). Without
``--artifacts`` the release is the shipped shapes model quantized to int8, int8-te8 and int4-te8, so
that each simulated device profile gets another variant (A10: int8, T4: int8-te8, Orin Nano:
int4-te8). Results: ``benchmarks/results/fleet-scale.{json,md,png}``.
"""

from __future__ import annotations

import sys

from report import RESULTS

from fleet.bench_cli import main

if __name__ == "__main__":
    sys.exit(main(["--out", str(RESULTS), *sys.argv[1:]]))
