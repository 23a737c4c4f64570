"""``zimage-edge bench fleet``: the fleet benchmarks of ``fleet.bench`` as a command (torch-free).

    zimage-edge bench fleet [--nodes 1000] [--duration 180] [--artifacts DIR...] [--out DIR]
    zimage-edge bench fleet --sweep [--setups sqlite/1,postgresql/1,postgresql/2] [--intervals 2,1,0.5]
                            [--big-nodes 5000] [--duration 45]

The first is the scale run (steady telemetry, then a rollout to every node: ``fleet-scale.*``), the
second the load sweep (ingest lag against offered load per setup, highest sustained load:
``fleet-load.*``). Each writes JSON, Markdown and a PNG plot to ``--out``; the sweep rewrites them
after every point, and ``--append`` adds its points to the runs already there (a long sweep in parts,
e.g. ``--intervals none --append`` for the big points alone). Without ``--artifacts`` the release is the
shipped shapes model, quantized first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from zimage_edge.errors import UsageError

# Three variants of different sizes, so that each simulated device profile gets another one
# (A10: int8, T4: int8-te8, Orin Nano: int4-te8); a sweep measures telemetry and needs one.
SCALE_VARIANTS = ("int8", "int8-te8", "int4-te8")
SWEEP_VARIANTS = ("int8",)


def register(bench: argparse._SubParsersAction) -> None:
    fleet = bench.add_parser("fleet", help="simulated nodes against a real broker and controller: scale or load")
    fleet.add_argument("--sweep", action="store_true", help="offered-load sweep instead of the scale run")
    fleet.add_argument("--nodes", type=int, default=1000, help="simulated nodes (each a real MQTT connection)")
    fleet.add_argument("--processes", type=int, default=4, help="simulator processes the nodes are split into")
    fleet.add_argument("--duration", type=float, help="seconds of measured steady telemetry (180; sweep: 45)")
    fleet.add_argument("--warmup", type=float, default=10.0, help="seconds of telemetry before measuring")
    fleet.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite", help="scale run's store")
    fleet.add_argument("--replicas", type=int, default=1, help="scale run's controller replicas")
    fleet.add_argument("--bake", type=float, default=5.0, help="scale run: bake time of each rollout wave")
    fleet.add_argument("--max-unavailable", type=int, default=100, help="scale run: nodes installing at once")
    fleet.add_argument("--setups", default="sqlite/1,postgresql/1,postgresql/2", help="sweep: DATABASE/REPLICAS,...")
    fleet.add_argument(
        "--intervals",
        default="2,1,0.67,0.5",
        help="sweep: telemetry intervals (s), one point each ('none': only the big points)",
    )
    fleet.add_argument("--big-nodes", type=int, default=5000, help="sweep: then this many nodes at 1 msg/s (0: none)")
    fleet.add_argument("--big-setups", default="sqlite/1,postgresql/1,postgresql/2", help="sweep: setups of those")
    fleet.add_argument(
        "--append",
        action="store_true",
        help="sweep: add these points to the runs already in OUT/NAME.json (a long sweep in parts)",
    )
    fleet.add_argument("--drain", type=float, default=120.0, help="seconds to wait for the last acks")
    fleet.add_argument("--artifacts", nargs="+", type=Path, help="release artifacts (default: the shapes model's)")
    fleet.add_argument("--out", type=Path, default=Path("out/bench"), help="where the results go")
    fleet.add_argument("--name", help="results file name (default: fleet-scale or fleet-load)")
    fleet.set_defaults(handler=_cmd_bench_fleet)


def _setups(text: str) -> list[tuple[str, int]]:
    setups = []
    for item in text.split(","):
        database, _, replicas = item.strip().partition("/")
        if database not in ("sqlite", "postgresql") or not replicas.isdigit() or int(replicas) < 1:
            raise UsageError(f"a setup is DATABASE/REPLICAS with DATABASE sqlite or postgresql, not {item!r}")
        setups.append((database, int(replicas)))
    return setups


def _intervals(text: str) -> list[float]:
    if text.strip() == "none":
        return []
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise UsageError(f"--intervals takes seconds separated by commas, not {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise UsageError("every telemetry interval must be above 0 s")
    return values


def sweep_points(args: argparse.Namespace) -> list[Any]:
    from fleet.bench import ScaleOptions  # the command's imports, not registration's

    common = {"processes": args.processes, "warmup_s": args.warmup, "duration_s": args.duration or 45.0,
              "rollout": False, "drain_s": args.drain}  # fmt: skip
    points = [
        ScaleOptions(nodes=args.nodes, interval_s=interval, database=database, replicas=replicas, **common)
        for database, replicas in _setups(args.setups)
        for interval in _intervals(args.intervals)
    ]
    if args.big_nodes:
        big = {**common, "nodes": args.big_nodes, "interval_s": 1.0, "connect_timeout_s": 600.0}
        points += [ScaleOptions(database=db, replicas=n, **big) for db, n in _setups(args.big_setups)]
    return points


def _write(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """JSON and Markdown, each complete or absent (a temporary file renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{name}.json", json.dumps(data, indent=2) + "\n"), (out / f"{name}.md", markdown)):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)


def _cmd_bench_fleet(args: argparse.Namespace) -> int:
    from fleet import bench
    from fleet.release_build import SHAPES_MODEL, quantize_release

    if args.nodes < 1 or args.processes < 1 or args.replicas < 1:
        raise UsageError("--nodes, --processes and --replicas must be at least 1")
    name = args.name or ("fleet-load" if args.sweep else "fleet-scale")
    points = sweep_points(args) if args.sweep else None  # bad setups are refused before anything runs
    if points == []:
        raise UsageError("the sweep has no points: give --intervals or --big-nodes")
    earlier: list[dict[str, Any]] = []
    if args.append:
        if not args.sweep:
            raise UsageError("--append adds to a sweep's results: use it with --sweep")
        existing = args.out / f"{name}.json"
        try:
            earlier = list(json.loads(existing.read_text())["runs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--append: cannot read the runs of {existing}: {exc}") from None

    async def run(artifacts: list[Path]) -> None:
        if points is not None:
            done: list[dict[str, Any]] = list(earlier)

            def save(result: dict[str, Any]) -> None:
                done.append(result)
                _write(args.out, name, {"runs": done}, bench.load_markdown(done))
                bench.plot_load(done, args.out / f"{name}.png")

            await bench.run_load_sweep(points, artifacts, on_point=save)
            print(bench.load_markdown(done))
        else:
            options = bench.ScaleOptions(
                nodes=args.nodes, processes=args.processes, duration_s=args.duration or 180.0,
                warmup_s=args.warmup, bake_s=args.bake, max_unavailable=args.max_unavailable,
                database=args.database, replicas=args.replicas, drain_s=args.drain,
            )  # fmt: skip
            results = await bench.run_scale(options, artifacts)
            _write(args.out, name, results, bench.markdown(results))
            bench.plot_scale(results, args.out / f"{name}.png")
            print(bench.markdown(results))

    with tempfile.TemporaryDirectory(prefix="fleet-release-") as tmp:

        async def main() -> None:
            variants = SWEEP_VARIANTS if args.sweep else SCALE_VARIANTS
            artifacts = args.artifacts or await quantize_release(SHAPES_MODEL, variants, Path(tmp))
            await run(list(artifacts))

        asyncio.run(main())
    print(f"results in {args.out / name}.{{json,md,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``zimage-edge bench fleet ARGS`` without the rest of the command (the benchmark scripts)."""
    parser = argparse.ArgumentParser(prog="zimage-edge bench")
    register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["fleet", *(argv if argv is not None else [])])
    try:
        return int(args.handler(args))
    except UsageError as exc:
        parser.error(str(exc))
