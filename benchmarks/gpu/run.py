"""The transformer on one GPU at the real Z-Image-Turbo dimensions: bf16 vs int8 vs fp8 vs int4.

    python benchmarks/gpu/run.py [--out FILE] [--tiny] [--resolutions 512,1024] [--steps 8] [--runs 3]

No download and no network: the transformer is built from its real config
(``quantize.specs.Z_IMAGE_TURBO_TRANSFORMER_CONFIG``, 6.15 B parameters) with seeded random weights
made on the device. For each variant (the project's recipes: linears quantized with optimum-quanto,
embedders and final layer excluded) it times ``--steps`` transformer forwards with an Euler update
(what the pipeline's denoising loop does; prompt encoding and VAE decoding are not part of it) at each
resolution against 256 random caption features, and reads the allocator's peak. Then, for
``--load-variants``, the cold load of a pre-quantized artifact component (written by the streaming
quantizer, loaded by ``quantize.load``) against loading the bf16 checkpoint and quantizing it, each in
a fresh process (its own peaks). One JSON file out, nothing asked.

Without CUDA, or with ``--tiny``, it runs the same code at tiny dimensions (the medium toy's width,
2 layers) on 64/128 px in float32, so the test suite covers it on CPU.

Budget of the real run on one H200/A100-class GPU (8 steps, 3 timed runs after a warm-up):
  random init on the GPU + bf16 checkpoint written (12.3 GB)       ~40 s
  per variant: init + quantize + freeze ~10 s; 512^2 ~0.3-1 s and 1024^2 ~1-4 s per 8 steps
  (quanto's weight-only int8/fp8/int4 dequantize in bf16: up to ~3x bf16), 4 calls each
                                                      4 variants:  ~2.5 min
  int8 artifact by the streaming quantizer (CPU)                   ~40 s
  cold loads in fresh processes (imports ~10 s each): pre-quantized ~20 s, bf16+quantize ~40 s
                                                                    ~1 min
  in all about 5 minutes, under the 8-minute limit with room for a slow disk; ``total_seconds`` in
  the JSON says what it took. Disk: ~19 GB in the work directory (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"
CAPTION_TOKENS = 256  # the planner's caption allowance (quantize.calibration.CAPTION_TOKENS)
TINY_CAPTION_TOKENS = 32  # a short prompt: the tiny run exists to exercise the code, in seconds
COMPONENT = "transformer"
CLASS_NAME = "ZImageTransformer2DModel"
INIT_STD = 0.02  # the usual init scale of transformer linears: keeps random activations finite over 34 blocks
SEED = 0
VARIANTS = ("bf16", "int8", "fp8", "int4")
# Child processes may take this long (a cold 12 GB read on a slow disk) before the run gives up on one.
CHILD_TIMEOUT_S = 300


def transformer_config(tiny: bool) -> dict[str, Any]:
    from quantize.specs import Z_IMAGE_TURBO_TRANSFORMER_CONFIG
    from zimage_edge.model.toy import TOY_SIZES

    if not tiny:
        return dict(Z_IMAGE_TURBO_TRANSFORMER_CONFIG)
    # The medium toy's width (int4 packs its feed-forward), two main layers: a few M parameters.
    size = replace(TOY_SIZES["medium"], n_layers=2, n_refiner_layers=1)
    return {
        **Z_IMAGE_TURBO_TRANSFORMER_CONFIG, "dim": size.dim, "n_layers": size.n_layers,
        "n_refiner_layers": size.n_refiner_layers, "n_heads": size.n_heads, "n_kv_heads": size.n_heads,
        "cap_feat_dim": size.text_hidden, "axes_dims": list(size.axes_dims),
    }  # fmt: skip


def build_random(config: dict[str, Any], dtype: Any, device: Any) -> Any:
    """The transformer with seeded random weights, made directly on ``device`` (no float copy elsewhere)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    if list(model.buffers()):
        raise RuntimeError("the transformer has buffers that random initialisation would leave empty")
    # The dtype first, on the meta device: storage is allocated once, in the compute dtype.
    torch.nn.Module.to(model, dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith("weight"):  # norm scales
                param.fill_(1.0)
            else:
                param.zero_()
    return model.eval()


def quantize_variant(model: Any, variant: str) -> int:
    """Quantize ``model`` in place with the project's recipe; returns the quantized weights."""
    from quantize.backend import BACKENDS, DEFAULT_BACKEND, quantize_in_memory
    from quantize.variants import VARIANTS as RECIPES

    return quantize_in_memory(model, RECIPES[variant].transformer, BACKENDS[DEFAULT_BACKEND])


def denoise(model: Any, size: int, args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """``steps`` forwards with Euler updates from seeded noise, as the pipeline's loop does."""
    import torch

    device, dtype, steps = args.device, getattr(torch, args.dtype), args.steps
    generator = torch.Generator("cpu").manual_seed(SEED)
    latent = torch.randn(16, 1, size // 8, size // 8, generator=generator).to(device, dtype)
    caption = torch.randn(args.caption_tokens, config["cap_feat_dim"], generator=generator) * 0.5
    caption = caption.to(device, dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1.0 - float(sigmas[i])], device=device, dtype=dtype)
            velocity = model([latent], t, [caption], return_dict=False)[0][0]
            latent = latent + (sigmas[i + 1] - sigmas[i]).item() * -velocity.to(dtype)
    return latent.float()


def measure_variant(variant: str, args: argparse.Namespace, config: dict[str, Any], bf16_out: dict[int, Any]) -> dict:
    import torch

    from quantize.peak_memory import PeakMeter, release_memory

    device, dtype = args.device, getattr(torch, args.dtype)
    meter = PeakMeter(device)
    release_memory(device)
    baseline = meter.reset()
    started = time.perf_counter()
    model = build_random(config, dtype, torch.device(device))
    quantized = quantize_variant(model, variant)
    prepare_s = time.perf_counter() - started
    weights = meter.current() - baseline
    row: dict[str, Any] = {"variant": variant, "quantized_weights": quantized, "prepare_seconds": round(prepare_s, 3),
                           "weights_bytes": weights, "cells": []}  # fmt: skip
    for size in args.resolutions:
        meter.reset()
        out = denoise(model, size, args, config)  # warm-up
        latencies = []
        for _ in range(args.runs):
            began = time.perf_counter()
            out = denoise(model, size, args, config)
            if device == "cuda":
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - began)
        cell: dict[str, Any] = {
            "resolution": size, "steps": args.steps, "runs": args.runs,
            "latency_p50_s": round(statistics.median(latencies), 5), "latency_max_s": round(max(latencies), 5),
            "peak_bytes": meter.peak() - baseline, "finite": bool(torch.isfinite(out).all()),
        }  # fmt: skip
        if variant == "bf16":
            bf16_out[size] = out
        elif size in bf16_out:
            ref = bf16_out[size]
            cell["latent_rel_l2_vs_bf16"] = round(float((out - ref).norm() / ref.norm()), 6)
        row["cells"].append(cell)
    del model
    release_memory(device)
    return row


def write_bf16_checkpoint(config: dict[str, Any], root: Path, device: str) -> int:
    import torch

    model = build_random(config, torch.bfloat16, torch.device(device))
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "ZImagePipeline", COMPONENT: ["diffusers", CLASS_NAME]})
    )
    model.save_pretrained(root / COMPONENT, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def write_artifact(bf16: Path, out: Path, variant: str) -> float:
    """The transformer as an artifact component: the streaming quantizer, as ``zimage-edge quantize`` runs it."""
    import shutil

    import torch

    from quantize.backend import BACKENDS, DEFAULT_BACKEND
    from quantize.components import build_skeleton
    from quantize.streaming import SourceWeights, quantize_component
    from quantize.variants import VARIANTS as RECIPES

    started = time.perf_counter()
    (out / COMPONENT).mkdir(parents=True)
    shutil.copy2(bf16 / "model_index.json", out / "model_index.json")
    shutil.copy2(bf16 / COMPONENT / "config.json", out / COMPONENT / "config.json")
    skeleton = build_skeleton(bf16 / COMPONENT, "diffusers", CLASS_NAME, torch.bfloat16)
    quantize_component(
        SourceWeights(bf16 / COMPONENT), skeleton, RECIPES[variant].transformer, storage_dtype=torch.bfloat16,
        out_dir=out / COMPONENT, backend=BACKENDS[DEFAULT_BACKEND],
    )  # fmt: skip
    return time.perf_counter() - started


def child_load(mode: str, root: Path, variant: str, device: str, dtype_name: str) -> dict[str, Any]:
    """In a fresh process: load the pre-quantized component, or load bf16 and quantize; seconds and peaks."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from quantize.load import load_component
    from quantize.peak_memory import PeakMeter, peak_rss

    dtype = getattr(torch, dtype_name)
    meter = PeakMeter(device)
    baseline = meter.reset()
    rss_before = peak_rss()
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": mode}
    if mode == "prequantized":
        model = load_component(root, COMPONENT, dtype, torch.device(device))
    else:
        model = ZImageTransformer2DModel.from_pretrained(root / COMPONENT, torch_dtype=dtype).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        result["load_bf16_seconds"] = round(time.perf_counter() - started, 3)
        quantize_variant(model, variant)
    if device == "cuda":
        torch.cuda.synchronize()
    result.update({
        "seconds": round(time.perf_counter() - started, 3),
        "device_peak_bytes": meter.peak() - baseline,
        "device_held_bytes": meter.current() - baseline,
        "host_peak_rss_bytes": peak_rss(),
        "host_rss_before_bytes": rss_before,
    })  # fmt: skip
    return result


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cold_loads(args: argparse.Namespace, config: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    bf16 = work / "bf16"
    bf16.mkdir()
    params = write_bf16_checkpoint(config, bf16, args.device)
    rows = []
    for variant in args.load_variants:
        artifact = work / variant
        quantize_seconds = write_artifact(bf16, artifact, variant)
        pre = run_child("prequantized", str(artifact), variant, args.device, args.dtype)
        naive = run_child("quantize-at-load", str(bf16), variant, args.device, args.dtype)
        row: dict[str, Any] = {
            "variant": variant, "params": params, "artifact_quantize_seconds": round(quantize_seconds, 2),
            "prequantized": pre, "quantize_at_load": naive,
        }  # fmt: skip
        if "error" not in pre and "error" not in naive:
            row["seconds_ratio"] = round(naive["seconds"] / pre["seconds"], 3)
            row["device_peak_ratio"] = round(naive["device_peak_bytes"] / max(pre["device_peak_bytes"], 1), 3)
        rows.append(row)
    return rows


def software() -> dict[str, str]:
    import torch

    from quantize.build import library_versions

    return {"python": platform.python_version(), "cuda": str(torch.version.cuda), **library_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results JSON (default results/gpu-<cuda|cpu>[-tiny].json)")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (automatic without CUDA)")
    parser.add_argument("--resolutions", help="square sizes (default 512,1024; tiny: 64,128)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per resolution after a warm-up")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of " + ",".join(VARIANTS))
    parser.add_argument("--load-variants", default="int8", help="variants whose cold loads are compared")
    parser.add_argument("--workdir", type=Path, help="scratch directory for checkpoints (default: a temporary one)")
    parser.add_argument(
        "--child", nargs=5, metavar=("MODE", "ROOT", "VARIANT", "DEVICE", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        mode, root, variant, device, dtype = args.child
        print(json.dumps(child_load(mode, Path(root), variant, device, dtype)))
        return

    import torch

    from zimage_edge.cpu import CpuSettings, configure_threads
    from zimage_edge.device import detect_device

    configure_threads(CpuSettings())
    started = time.perf_counter()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.tiny = args.tiny or args.device == "cpu"
    # bf16 on GPUs (the model's dtype); float32 on CPU, where bf16 matmuls are emulated.
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.resolutions = [int(s) for s in (args.resolutions or ("64,128" if args.tiny else "512,1024")).split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    args.load_variants = [v for v in args.load_variants.split(",") if v]
    args.caption_tokens = TINY_CAPTION_TOKENS if args.tiny else CAPTION_TOKENS
    config = transformer_config(args.tiny)
    bf16_out: dict[int, Any] = {}
    variants = []
    for variant in args.variants:
        try:
            variants.append(measure_variant(variant, args, config, bf16_out))
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # a kernel this GPU lacks: say which
            variants.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="gpu-bench-") as tmp:
        loads = cold_loads(args, config, Path(tmp))
    report = {
        "device": detect_device().to_dict(), "software": software(), "tiny": args.tiny, "dtype": args.dtype,
        "config": {"transformer": config, "resolutions": args.resolutions, "steps": args.steps, "runs": args.runs,
                   "caption_tokens": args.caption_tokens},
        "variants": variants, "cold_load": loads, "total_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    out = args.out or RESULTS / f"gpu-{args.device}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in variants:
        cells = ", ".join(
            f"{c['resolution']}px {c['latency_p50_s']:.3f}s {c['peak_bytes'] / 2**30:.2f} GiB"
            for c in row.get("cells", [])
        )
        print(f"{row['variant']:5s} {row.get('error', cells)}")
    print(f"wrote {out} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
