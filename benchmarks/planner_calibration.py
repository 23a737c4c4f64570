"""Measure the planner's activation factors on this device and compare them with quantize.calibration.

    python benchmarks/planner_calibration.py [--model DIR] [--sizes 512,1024]

For the transformer and the VAE decoder it measures the extra memory of one forward pass at two
resolutions, and turns the difference (which cancels weights and fixed overheads) into the factor
the planner uses:

    transformer: bytes / (tokens * dim * dtype bytes)        vs TRANSFORMER_ACT_FACTOR
    vae:         bytes / (pixels * full-res channels * bytes) vs VAE_ACT_FACTOR

On CUDA the measure is ``torch.cuda.max_memory_allocated``; on CPU each pass runs in a fresh process
and the measure is its peak RSS above the RSS before the pass (``ru_maxrss``). CPU attention may fall
back to the math kernel (it holds the tokens^2 score matrix), so CPU factors for the transformer are
an upper bound for GPUs with fused attention. Without ``--model`` a medium toy model is built.
Results go to ``benchmarks/results/planner-calibration-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from report import RESULTS, peak_rss, rss_now, run_fresh, write_results

CAPTION_TOKENS = 64


def measure_once(model: Path, stage: str, size: int) -> dict[str, Any]:
    """One forward pass of ``stage`` at ``size``x``size`` in this process; returns the extra bytes."""
    import torch

    from zimage_edge.model.loading import load_pipeline

    loaded = load_pipeline(model)
    pipe, device = loaded.pipe, torch.device(loaded.device)
    dtype = loaded.dtype
    latent = size // 8
    with torch.no_grad():
        if stage == "transformer":
            tr = pipe.transformer
            inputs = (
                [torch.randn(16, 1, latent, latent, device=device, dtype=dtype)],
                torch.tensor([0.5], device=device),
                [torch.randn(CAPTION_TOKENS, tr.config.cap_feat_dim, device=device, dtype=dtype)],
            )

            def run() -> None:
                tr(*inputs)
        else:
            vae = pipe.vae
            z = torch.randn(1, 16, latent, latent, device=device, dtype=dtype)

            def run() -> None:
                vae.decode(z)

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
            valid = True
        else:
            high_water = peak_rss()
            before = rss_now()
            run()
            peak = peak_rss()
            extra = peak - before
            valid = peak > high_water  # the pass set a new high-water mark, so the peak is its own
    config = pipe.transformer.config
    return {
        "stage": stage,
        "size": size,
        "extra_bytes": extra,
        "valid": valid,
        "dtype_bytes": torch.finfo(dtype).bits // 8,
        "dim": config.dim,
        "tokens": (size // 16) ** 2 + CAPTION_TOKENS,
        "vae_channels": pipe.vae.config.block_out_channels[0],
        "device": loaded.facts.to_dict(),
    }


def run_child(model: Path, stage: str, size: int) -> dict[str, Any]:
    return run_fresh(__file__, "--child", stage, "--model", str(model), "--sizes", str(size))


def factor(small: dict[str, Any], large: dict[str, Any]) -> float:
    delta = large["extra_bytes"] - small["extra_bytes"]
    if small["stage"] == "transformer":
        units = (large["tokens"] - small["tokens"]) * large["dim"]
    else:
        units = (large["size"] ** 2 - small["size"] ** 2) * large["vae_channels"]
    return float(delta / (units * large["dtype_bytes"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="diffusers directory (default: a fresh medium toy model)")
    parser.add_argument("--sizes", default="512,1024", help="two square resolutions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["transformer", "vae"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        print(json.dumps(measure_once(args.model, args.child, sizes[0])))
        return

    from quantize import calibration

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from zimage_edge.model.toy import save_toy_model

            model = save_toy_model(Path(tmp) / "medium", size="medium")
        runs = {stage: [run_child(model, stage, size) for size in sizes] for stage in ("transformer", "vae")}
    measured = {stage: factor(*pair) for stage, pair in runs.items()}
    report = {
        "device": runs["vae"][0]["device"],
        "runs": runs,
        "measured_factor": measured,
        "planner_factor": {"transformer": calibration.TRANSFORMER_ACT_FACTOR, "vae": calibration.VAE_ACT_FACTOR},
        "all_valid": all(r["valid"] for pair in runs.values() for r in pair),
    }
    for stage in ("transformer", "vae"):
        detail = ", ".join(f"{r['size']}px: {r['extra_bytes'] / 2**20:.0f} MiB" for r in runs[stage])
        planner = report["planner_factor"][stage]
        print(f"{stage:11s} measured factor {measured[stage]:6.2f}  planner {planner:6.2f}  ({detail})")
    if not report["all_valid"]:
        print("warning: a pass did not exceed the load peak; choose larger --sizes")
    path = write_results(args.out, f"planner-calibration-{report['device']['kind']}", report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
