"""Peak memory and time of quantizing the full-size transformer: streaming vs load-then-quantize.

    python benchmarks/quantize_memory.py [--layers 30] [--naive-layers 8] [--workdir DIR]

1. Writes a random-weight bf16 checkpoint of ``ZImageTransformer2DModel`` with the real config and the
   real tensor names (taken from a meta-device model), shard by shard, never holding it whole.
2. Quantizes it to int8 in a fresh process with the streaming quantizer (``quantize.streaming``).
3. Quantizes it in a fresh process the naive way: ``from_pretrained`` the whole model, ``quantize``,
   ``freeze``, save.
Each child reports its own peak RSS (``ru_maxrss``) and its RSS after imports (the baseline both
share). The naive path at 30 layers needs ~2x the 12.3 GB checkpoint in RAM, more than small machines
have, so by default the comparison runs at ``--naive-layers`` (real width, fewer layers) for both
paths, and the streaming path alone runs at the full 30 layers.
Results go to ``benchmarks/results/quantize-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from report import RESULTS, peak_rss, rss_now, run_fresh, write_results

from quantize.specs import Z_IMAGE_TURBO_TRANSFORMER_CONFIG

GIB = 1024**3
REAL_CONFIG = Z_IMAGE_TURBO_TRANSFORMER_CONFIG


def write_checkpoint(directory: Path, layers: int) -> int:
    """Random bf16 weights with the real names and shapes, written shard by shard; returns params."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from quantize.streaming import ShardWriter

    config = {**REAL_CONFIG, "n_layers": layers}
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps({"_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.42.1", **config}, indent=2)
    )
    writer = ShardWriter(directory, max_bytes=2 * GIB, stem="diffusion_pytorch_model")
    generator = torch.Generator().manual_seed(0)
    params = 0
    for name, meta in model.state_dict().items():
        tensor = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
        params += tensor.numel()
        writer.add({name: tensor})
    writer.close()
    return params


def child_streaming(source: Path, out: Path) -> dict[str, Any]:
    import torch

    from quantize.backend import BACKENDS
    from quantize.components import build_skeleton
    from quantize.streaming import SourceWeights, quantize_component
    from quantize.variants import VARIANTS

    baseline = rss_now()
    started = time.perf_counter()
    skeleton = build_skeleton(source, "diffusers", "ZImageTransformer2DModel", torch.bfloat16)
    result = quantize_component(
        SourceWeights(source), skeleton, VARIANTS["int8"].transformer,
        storage_dtype=torch.bfloat16, out_dir=out, backend=BACKENDS["optimum-quanto"],
    )  # fmt: skip
    return {"seconds": time.perf_counter() - started, "baseline_rss": baseline, "peak_rss": peak_rss(),
            "out_bytes": result.bytes}  # fmt: skip


def child_naive(source: Path, out: Path) -> dict[str, Any]:
    import torch
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from quantize.backend import BACKENDS, quantize_in_memory
    from quantize.variants import VARIANTS

    baseline = rss_now()
    started = time.perf_counter()
    model = ZImageTransformer2DModel.from_pretrained(source, torch_dtype=torch.bfloat16)
    quantize_in_memory(model, VARIANTS["int8"].transformer, BACKENDS["optimum-quanto"])
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return {"seconds": time.perf_counter() - started, "baseline_rss": baseline, "peak_rss": peak_rss(),
            "out_bytes": sum(t.numel() * t.element_size() for t in state.values())}  # fmt: skip


def run_child(mode: str, source: Path, out: Path) -> dict[str, Any]:
    return run_fresh(__file__, "--child", mode, "--source", str(source), "--out", str(out), check=False)


def measure(workdir: Path, layers: int, naive: bool) -> dict[str, Any]:
    source = workdir / f"transformer-{layers}"
    started = time.perf_counter()
    params = write_checkpoint(source, layers)
    row: dict[str, Any] = {"layers": layers, "params": params, "write_seconds": time.perf_counter() - started}
    row["streaming"] = run_child("streaming", source, workdir / f"stream-{layers}")
    if naive:
        row["naive"] = run_child("naive", source, workdir / f"naive-{layers}")
    shutil.rmtree(source)
    return row


def _fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    work = (result["peak_rss"] - result["baseline_rss"]) / GIB
    return f"{result['peak_rss'] / GIB:.2f} GiB peak ({work:.2f} GiB above imports), {result['seconds']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="main layers of the streaming-only run (real: 30)")
    parser.add_argument("--naive-layers", type=int, default=8, help="main layers of the side-by-side run")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["streaming", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_streaming if args.child == "streaming" else child_naive
        print(json.dumps(child(args.source, args.out)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        side_by_side = measure(work, args.naive_layers, naive=True)
        full = measure(work, args.layers, naive=False) if args.layers != args.naive_layers else None

    s, n = side_by_side["streaming"], side_by_side["naive"]
    ratios = {}
    if "error" not in s and "error" not in n:
        ratios = {
            "peak_rss_naive_over_streaming": n["peak_rss"] / s["peak_rss"],
            "work_rss_naive_over_streaming": (n["peak_rss"] - n["baseline_rss"]) / (s["peak_rss"] - s["baseline_rss"]),
            "seconds_naive_over_streaming": n["seconds"] / s["seconds"],
            "output_bytes_equal": n["out_bytes"] == s["out_bytes"],
        }
    report = {"side_by_side": side_by_side, "full_size_streaming": full, "ratios": ratios}
    lines = [
        "# Quantizing the transformer to int8: streaming vs load-then-quantize",
        "",
        "| run | params | streaming | naive |",
        "|---|---|---|---|",
        f"| {side_by_side['layers']} layers (real width) | {side_by_side['params'] / 1e9:.2f} B "
        f"| {_fmt(s)} | {_fmt(n)} |",
    ]
    if full:
        lines.append(
            f"| {full['layers']} layers (the real transformer) | {full['params'] / 1e9:.2f} B "
            f"| {_fmt(full['streaming'])} | not run (needs ~2x the checkpoint in RAM) |"
        )
    if ratios:
        lines += [
            "",
            f"Naive / streaming, same model, one run: peak RSS {ratios['peak_rss_naive_over_streaming']:.2f}x, "
            f"RSS above imports {ratios['work_rss_naive_over_streaming']:.2f}x, "
            f"time {ratios['seconds_naive_over_streaming']:.2f}x.",
        ]
    text = "\n".join(lines) + "\n"
    write_results(args.out, "quantize-memory", report, text)


if __name__ == "__main__":
    main()
