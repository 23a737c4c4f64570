"""Fleet ingest under load: the highest telemetry rate a controller sustains, with TLS and ACLs on.

    python benchmarks/fleet_load.py [--setups sqlite/1,postgresql/1,postgresql/2] [--nodes 1000]
        [--intervals 2,1,0.5,0.33,0.25] [--big-nodes 5000] [--duration 45] [--artifacts DIR...]

For each setup (database / controller replicas), ``--nodes`` simulated nodes publish telemetry at each
interval in turn (offered load = nodes / interval), each point on a fresh site: broker, PKI, database,
controllers (``fleet.bench.run_load_sweep``). Then ``--big-nodes`` nodes at one message per second on
each setup. Per point: offered (as published) and stored rate, loss and duplicates after the drain,
ingest lag p50/p99, CPU and RSS of every process. Results: ``benchmarks/results/fleet-load.{json,md,png}``,
written again after every point (a long sweep keeps what it measured so far).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from fleet_scale import build_release
from report import RESULTS, write_results

from fleet.bench import ScaleOptions, load_markdown, plot_load, run_load_sweep


def points(args: argparse.Namespace) -> list[ScaleOptions]:
    common = {"processes": args.processes, "warmup_s": args.warmup, "duration_s": args.duration, "rollout": False,
              "drain_s": args.drain}  # fmt: skip
    chosen = []
    for setup in args.setups.split(","):
        database, replicas = setup.split("/")
        for interval in args.intervals:
            chosen.append(ScaleOptions(nodes=args.nodes, interval_s=interval, database=database,
                                       replicas=int(replicas), **common))  # fmt: skip
    if args.big_nodes:
        for setup in args.big_setups.split(","):
            database, replicas = setup.split("/")
            chosen.append(ScaleOptions(nodes=args.big_nodes, interval_s=1.0, database=database,
                                       replicas=int(replicas), connect_timeout_s=600.0, **common))  # fmt: skip
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="sqlite/1,postgresql/1,postgresql/2", help="DATABASE/REPLICAS,...")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--intervals", type=lambda v: [float(x) for x in v.split(",")], default=[2, 1, 0.5, 0.33, 0.25],
                        help="telemetry intervals (s) per node, one point each")  # fmt: skip
    parser.add_argument("--big-nodes", type=int, default=5000, help="then this many nodes at 1 msg/s (0: skip)")
    parser.add_argument("--big-setups", default="sqlite/1,postgresql/1,postgresql/2")
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of measured steady telemetry")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=120.0, help="how long a point waits for the last acks")
    parser.add_argument("--artifacts", nargs="+", type=Path, help="the release (default: the shapes model, int8)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="fleet-load")
    args = parser.parse_args()

    def save(runs: list[dict[str, Any]]) -> None:
        write_results(args.out, args.name, {"runs": runs}, load_markdown(runs))
        plot_load(runs, args.out / f"{args.name}.png")

    done: list[dict[str, Any]] = []

    def on_point(run: dict[str, Any]) -> None:
        done.append(run)
        save(done)

    with tempfile.TemporaryDirectory(prefix="fleet-release-") as tmp:
        artifacts = args.artifacts or build_release(Path(tmp), ("int8",))
        asyncio.run(run_load_sweep(points(args), artifacts, on_point=on_point))


if __name__ == "__main__":
    main()
