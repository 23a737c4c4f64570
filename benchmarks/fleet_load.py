"""Fleet ingest under load: the highest telemetry rate a controller sustains, with TLS and ACLs on.

    python benchmarks/fleet_load.py [--setups sqlite/1,postgresql/1,postgresql/2] [--nodes 1000]
        [--intervals 2,1,0.67,0.5] [--big-nodes 5000] [--duration 45] [--artifacts DIR...]

``zimage-edge bench fleet --sweep`` writing into ``benchmarks/results/``. For each setup (database /
controller replicas), ``--nodes`` simulated nodes publish telemetry at each interval in turn (offered
load = nodes / interval), each point on a fresh site: broker, PKI, database, controllers. Then
``--big-nodes`` nodes at one message per second on each setup. Per point: offered (as published) and
stored rate, loss and duplicates after the drain, ingest lag p50/p99, CPU and RSS of every process.
Results: ``benchmarks/results/fleet-load.{json,md,png}``, written again after every point.
"""

from __future__ import annotations

import sys

from report import RESULTS

from fleet.bench_cli import main

if __name__ == "__main__":
    sys.exit(main(["--sweep", "--out", str(RESULTS), *sys.argv[1:]]))
