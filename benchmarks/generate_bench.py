"""Stage timings of the generation function, by resolution and batch size, in one run.

    python benchmarks/generate_bench.py [--model DIR] [--sizes 128,256,512] [--batches 1,4] [--repeats 5]

Without ``--model`` it builds the tiny toy model in a temporary directory. Reports the median of each
stage and the images/s ratio of each batch size against batch 1 at the same resolution, and writes
the numbers as JSON next to this file (``results/generate-<device>.json``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from report import RESULTS, write_results
from rich.console import Console
from rich.table import Table

from zimage_edge.model.generate import generate_batch
from zimage_edge.model.loading import load_pipeline
from zimage_edge.model.toy import save_toy_model
from zimage_edge.request import GenerationRequest


def run(model: str, sizes: list[int], batches: list[int], repeats: int) -> dict[str, Any]:
    loaded = load_pipeline(model)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        base_rate = None
        for batch in batches:
            requests = [
                GenerationRequest(prompt=f"a red circle number {i}", width=size, height=size, seed=i)
                for i in range(batch)
            ]
            generate_batch(loaded.pipe, requests)  # warm-up: allocator, kernels, caches
            samples = [generate_batch(loaded.pipe, requests)[0].timings for _ in range(repeats)]
            total = statistics.median(t.total_sec for t in samples)
            rate = batch / total
            base_rate = base_rate or rate
            rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "encode_sec": statistics.median(t.encode_sec for t in samples),
                    "denoise_sec": statistics.median(t.denoise_sec for t in samples),
                    "decode_sec": statistics.median(t.decode_sec for t in samples),
                    "total_sec": total,
                    "images_per_sec": rate,
                    "gain_vs_batch1": rate / base_rate,
                }
            )
    return {"device": loaded.facts.to_dict(), "policy": loaded.policy.to_dict(), "model": model, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers directory (default: a fresh tiny toy model)")
    parser.add_argument("--sizes", default="128,256,512", help="square resolutions, comma-separated")
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(save_toy_model(Path(tmp) / "tiny"))
        report = run(model, sizes, batches, args.repeats)
    table = Table(title=f"generation stages on {report['device']['name']} ({report['policy']['dtype']})")
    for column in ("size", "batch", "encode s", "denoise s", "decode s", "total s", "img/s", "gain"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(
            str(row["size"]), str(row["batch"]), f"{row['encode_sec']:.4f}", f"{row['denoise_sec']:.4f}",
            f"{row['decode_sec']:.4f}", f"{row['total_sec']:.4f}", f"{row['images_per_sec']:.2f}",
            f"{row['gain_vs_batch1']:.2f}x",
        )  # fmt: skip
    Console().print(table)
    path = write_results(args.out, f"generate-{report['device']['kind']}", report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
