"""Quality of each quantized variant of the shipped shapes model: prompt adherence next to PSNR/SSIM.

    python benchmarks/shapes_quality.py [--variants bf16 int8 fp8 int4 ...] [--seeds 1000 1001 1002]

Builds every variant as a real artifact through the quantize pipeline (quality gate included, forced
so that a variant failing its thresholds is still measured), then loads each artifact the way a node
does and scores prompt adherence on all 90 captions for every seed: the full-precision model is the
reference. Results go to ``benchmarks/results/shapes-quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from report import RESULTS, write_results


def measure(variants: list[str], seeds: tuple[int, ...], workdir: Path) -> list[dict[str, Any]]:
    from quantize.build import BuildOptions, build_artifact
    from quantize.load import load_artifact
    from quantize.manifest import read_manifest
    from quantize.quality import QualitySpec
    from quantize.variants import get_variant
    from zimage_edge.device import detect_device
    from zimage_edge.model.loading import load_pipeline
    from zimage_edge.shapes import PRETRAINED
    from zimage_edge.shapes.evaluate import evaluate

    facts = detect_device()
    rows = []
    reference = load_pipeline(PRETRAINED, facts=facts)
    rows.append(
        {
            "variant": "reference",
            "dtype": str(reference.policy.dtype),
            "bytes": sum(p.stat().st_size for p in PRETRAINED.rglob("*.safetensors")),
            "adherence": evaluate(reference.pipe, seeds),
        }
    )
    del reference
    options = BuildOptions(quality=QualitySpec(width=64, height=64), force=True, facts=facts)
    for name in variants:
        out = workdir / name
        started = time.perf_counter()
        build_artifact(PRETRAINED, get_variant(name), out, options)
        build_seconds = time.perf_counter() - started
        manifest, _ = read_manifest(out)
        loaded = load_artifact(out, facts=facts)
        rows.append(
            {
                "variant": name,
                "bytes": sum(f.size for path, f in manifest.files.items() if path.endswith(".safetensors")),
                "build_seconds": round(build_seconds, 1),
                "gate": manifest.quality.status,
                "psnr_db_mean": manifest.quality.psnr_db_mean,
                "ssim_mean": manifest.quality.ssim_mean,
                "gate_adherence": manifest.quality.extra.get("shape_adherence"),
                "adherence": evaluate(loaded.pipe, seeds),
            }
        )
        del loaded
    return rows


def table(rows: list[dict[str, Any]], seeds: tuple[int, ...]) -> str:
    ref = rows[0]
    lines = [
        f"Shapes model, 90 captions x {len(seeds)} seeds at 64x64, 8 steps, guidance 0; accuracy read from the pixels.",
        "",
        "| variant | weights | vs reference | PSNR dB | SSIM | color acc | shape acc | color Δ (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc = row["adherence"]
        delta = 100 * (acc["color_accuracy"] - ref["adherence"]["color_accuracy"])
        psnr = "—" if row.get("psnr_db_mean") is None else f"{row['psnr_db_mean']:.1f}"
        ssim = "—" if row.get("ssim_mean") is None else f"{row['ssim_mean']:.3f}"
        lines.append(
            f"| {row['variant']} | {row['bytes'] / 2**20:.2f} MiB | {row['bytes'] / ref['bytes']:.2f}x | {psnr} "
            f"| {ssim} | {acc['color_accuracy']:.3f} | {acc['shape_accuracy']:.3f} | {delta:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["bf16", "int8", "fp8", "int4", "int8-te8", "int4-te8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = tuple(args.seeds)
    with tempfile.TemporaryDirectory(prefix="shapes-quality-") as tmp:
        rows = measure(args.variants, seeds, Path(tmp))
    write_results(args.out, "shapes-quality", {"seeds": seeds, "rows": rows}, table(rows, seeds))


if __name__ == "__main__":
    main()
