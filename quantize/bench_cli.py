"""The ``zimage-edge bench`` command group: ``bench device`` and ``bench compare`` here; the agent's
and the fleet's benchmarks add ``bench agent`` and ``bench fleet`` from their own packages.

    zimage-edge bench device --artifact DIR... [--resolutions 512,768,1024] [--steps 8] [--batch 1,2,4]
                             [--runs N] [--profile NAME] [--out DIR]
    zimage-edge bench compare RESULTS.json... [--out DIR]

Importing this module is torch-free: handlers import the model stack and matplotlib when they run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zimage_edge.errors import UsageError
from zimage_edge.request import DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_STEPS

DEFAULT_OUT = Path("out/bench")


def _ints(text: str, what: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, not {text!r}") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{what} must be integers of at least {minimum}, not {text!r}")
    return values


def _cmd_device(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from quantize.bench_device import DeviceBenchSpec, run_device_bench
    from quantize.bench_report import write_report

    spec = DeviceBenchSpec(
        artifacts=tuple(Path(a) for a in args.artifact),
        resolutions=_ints(args.resolutions, "--resolutions"),
        batches=_ints(args.batch, "--batch"),
        steps=args.steps,
        runs=args.runs,
        max_sequence_length=args.max_sequence_length,
        quality=not args.no_quality,
        quality_seeds=_ints(args.quality_seeds, "--quality-seeds", minimum=0),
        adherence_scenes=args.adherence_scenes,
        reference=Path(args.reference) if args.reference else None,
        profile=args.profile,
    )
    with tqdm(desc="bench device", unit="step", disable=args.quiet) as bar:

        def progress(what: str, done: int, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(what, refresh=False)
            bar.update(done - bar.n)

        results = run_device_bench(spec, progress=progress)
    name = args.name or f"device-{results.device['kind']}"
    paths = write_report(results, Path(args.out), name)
    for a in results.artifacts:
        worst = max(a.cells, key=lambda c: abs(c.relative_error))
        print(
            f"{a.variant:10s} load {a.load.seconds:.2f}s; {worst.width}px x{worst.batch}: p50 "
            f"{worst.latency_p50_s:.4f}s, peak {worst.peak_bytes / 2**20:.1f} MiB, planner "
            f"{worst.predicted.peak_bytes / 2**20:.1f} MiB ({100 * worst.relative_error:+.1f}%)"
        )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from quantize.bench_report import compare_markdown, plot_compare, run_labels
    from quantize.bench_results import read_results

    paths = [Path(p) for p in args.results]
    try:
        runs = list(zip(run_labels(paths), [read_results(p) for p in paths], strict=True))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_compare(runs, out / f"{args.name}.png")
    text = compare_markdown(runs) + f"\n![{plot.stem}]({plot.name})\n"
    (out / f"{args.name}.md").write_text(text)
    print(text)
    print(f"wrote {out / f'{args.name}.md'}, {plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` with ``device`` and ``compare``, and the agent's and the fleet's benchmarks."""
    from edge_agent import bench_cli as agent_bench_cli
    from fleet import bench_cli as fleet_bench_cli

    bench = sub.add_parser("bench", help="benchmarks: a device, the agent, the fleet; compare results")
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")

    dev = actions.add_parser("device", help="load time, latency, memory and quality of artifacts on this device")
    dev.add_argument("--artifact", nargs="+", required=True, help="artifact directories to measure")
    dev.add_argument("--resolutions", default="512,768,1024", help="square sizes, comma-separated")
    dev.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    dev.add_argument("--batch", default="1,2,4", help="images per call, comma-separated (default 1,2,4)")
    dev.add_argument("--runs", type=int, default=5, help="timed calls per cell, after one warm-up (default 5)")
    dev.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH, help="prompt tokens kept")
    dev.add_argument("--profile", help="device profile the results describe (default: the detected device)")
    dev.add_argument("--reference", help="the bf16 model the artifacts were made from (default: their source)")
    dev.add_argument("--no-quality", action="store_true", help="skip the comparison with the reference")
    dev.add_argument("--quality-seeds", default="0", help="seeds of the quality comparison (default 0)")
    dev.add_argument("--adherence-scenes", type=int, help="shapes model: score the first N captions (default all)")
    dev.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the results go (default {DEFAULT_OUT})")
    dev.add_argument("--name", help="file name stem (default device-<cpu|cuda|jetson>)")
    dev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dev.set_defaults(handler=_cmd_device, uses_torch=True)

    cmp = actions.add_parser("compare", help="render several device results files side by side")
    cmp.add_argument("results", nargs="+", help="results files of `bench device` (devices or variants)")
    cmp.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the comparison goes (default {DEFAULT_OUT})")
    cmp.add_argument("--name", default="compare", help="file name stem (default compare)")
    cmp.set_defaults(handler=_cmd_compare)

    agent_bench_cli.register(actions)
    fleet_bench_cli.register(actions)
