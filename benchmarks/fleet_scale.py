"""The fleet at scale: 1,000 simulated nodes, one Mosquitto, one controller (see ``fleet/bench.py``).

    python benchmarks/fleet_scale.py [--nodes 1000] [--duration 180] [--processes 4] [--artifacts DIR...]

Telemetry at one message per node per second for the duration: ingest rate, loss (must be 0),
duplicates, the controller's CPU and RSS, ack latency; then the time for a rollout to every node to
converge (downloads excluded). Without ``--artifacts`` the release is the shipped shapes model
quantized to int8, int8-te8 and int4-te8 (built first, in separate processes), so that each simulated
device profile gets another variant (A10: int8, T4: int8-te8, Orin Nano: int4-te8). Results:
``benchmarks/results/fleet-scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from report import RESULTS, write_results

from fleet.bench import ScaleOptions, markdown, run_scale

SHAPES = Path(__file__).resolve().parents[1] / "zimage_edge" / "shapes" / "pretrained"
VARIANTS = ("int8", "int8-te8", "int4-te8")


def build_release(out: Path, variants: tuple[str, ...] = VARIANTS) -> list[Path]:
    """The shapes model as int8, int8-te8 and int4-te8 artifacts, each built by ``zimage-edge quantize``.

    int4-te8 is kept with ``--force``: at the shapes model's 64x64 its PSNR (~20-23 dB on one seed) misses
    the generic 25 dB gate although its prompt adherence holds (``shapes_quality.py``); this benchmark
    measures the fleet, and only needs three real, signed-off artifacts of different sizes."""
    built = []
    for variant in variants:
        target = out / variant
        force = ["--force"] if variant.startswith("int4") else []
        subprocess.run(
            [sys.executable, "-m", "zimage_edge.cli", "quantize", "--source", str(SHAPES), "--variant", variant,
             "--out", str(target), "--quiet", *force],
            check=True,
        )  # fmt: skip
        built.append(target)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of measured steady telemetry")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--bake", type=float, default=5.0, help="bake time of each rollout wave")
    parser.add_argument("--max-unavailable", type=int, default=100)
    parser.add_argument("--rollout-timeout", type=float, default=600.0)
    parser.add_argument("--artifacts", nargs="+", type=Path, help="release artifacts (default: build them)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, help="keep the broker's and controller's files here (debugging)")
    parser.add_argument("--name", default="fleet-scale")
    args = parser.parse_args()
    options = ScaleOptions(
        nodes=args.nodes, processes=args.processes, duration_s=args.duration, warmup_s=args.warmup,
        bake_s=args.bake, max_unavailable=args.max_unavailable, rollout_timeout_s=args.rollout_timeout,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fleet-release-") as tmp:
        artifacts = args.artifacts or build_release(Path(tmp))
        results = asyncio.run(run_scale(options, artifacts, args.work))
    write_results(args.out, args.name, results, markdown(results))


if __name__ == "__main__":
    main()
