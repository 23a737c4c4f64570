"""``zimage-edge distill transformer|text-encoder``: make a student of a pipeline.

Importing this module is torch-free: handlers import the model stack only when they run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zimage_edge.errors import UsageError


def _bars(quiet: bool) -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def report(stage: str, step: int, steps: int, loss: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=steps, initial=step - 1, desc=f"distill {stage}", unit="step",
                                     disable=quiet)  # fmt: skip
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
        if step == steps:
            bar.close()

    return report


def _print_result(info: Any, out: str) -> None:
    quality = info.quality
    psnr, ssim = quality["psnr_db_mean"], quality["ssim_mean"]
    print(f"quality against the teacher: PSNR mean {psnr:.2f} dB, SSIM mean {ssim:.4f}")
    if "adherence" in quality:
        print("adherence:", json.dumps(quality["adherence"]))
    print(f"student written to {out}")


def _check_out(args: argparse.Namespace) -> None:
    if Path(args.out).exists():
        raise UsageError(f"{args.out} already exists")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise UsageError(f"prompt file {args.prompts} does not exist")


def _cmd_transformer(args: argparse.Namespace) -> int:
    from quantize.distill.build import run_transformer
    from quantize.distill.recipe import TransformerRecipe

    _check_out(args)
    recipe = TransformerRecipe(
        keep=args.keep, steps=args.steps, batch=args.batch, lr=args.lr, hidden_weight=args.hidden_weight,
        seeds_per_prompt=args.seeds_per_prompt, early_weight=args.early_weight, width=args.size, height=args.size,
        max_sequence_length=args.max_sequence_length, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    try:
        info = run_transformer(args.teacher, Path(args.out), recipe, prompts_file=_path(args.prompts),
                               work_dir=_path(args.work_dir), report=_bars(args.quiet))  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print("kept layers:", info.components["transformer"]["selection"]["kept"])
    _print_result(info, args.out)
    return 0


def _cmd_text_encoder(args: argparse.Namespace) -> int:
    from quantize.distill.build import run_text_encoder
    from quantize.distill.recipe import TextEncoderRecipe

    _check_out(args)
    if args.hidden % args.heads:
        raise UsageError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    recipe = TextEncoderRecipe(
        layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
        kv_heads=args.kv_heads, steps=args.steps, batch=args.batch, lr=args.lr,
        max_sequence_length=args.max_sequence_length, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    try:
        info = run_text_encoder(args.teacher, Path(args.out), recipe, prompts_file=_path(args.prompts),
                                work_dir=_path(args.work_dir), report=_bars(args.quiet))  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    te = info.components["text_encoder"]
    print(f"text encoder: {te['params']:,} parameters ({te['params_ratio']:.3f} x the teacher's)")
    _print_result(info, args.out)
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _common(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    parser.add_argument("--teacher", required=True, help="the teacher: a pipeline directory or a Hugging Face id")
    parser.add_argument("--out", required=True, help="student directory to create (must not exist)")
    parser.add_argument("--prompts", help="prompt list file, one per line (default: the shapes captions for the "
                        "shapes model; required otherwise)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    parser.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--max-sequence-length", type=int, default=64, help="prompt tokens (default 64; the "
                        "real model's pipeline default is 512)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument("--work-dir", help="checkpoint and loss curves (default: OUT.distill-work); a run "
                        "started again with the same one resumes")  # fmt: skip
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser("distill", help="make a smaller student of a pipeline (transformer or text encoder)")
    kinds = distill.add_subparsers(dest="distill_command", required=True, metavar="WHAT")

    tr = kinds.add_parser("transformer", help="depth-pruned transformer trained on the teacher's trajectories")
    _common(tr, steps=1500, batch=32, lr=5e-4)
    tr.add_argument("--keep", type=int, required=True, help="main layers to keep (e.g. half of the teacher's)")
    tr.add_argument("--hidden-weight", type=float, default=0.1, help="weight of hidden-state matching (default 0.1)")
    tr.add_argument("--early-weight", type=float, default=1.0, help="how much more often states of the first "
                    "half of the schedule are drawn (default 1.0: uniformly)")  # fmt: skip
    tr.add_argument("--seeds-per-prompt", type=int, default=8, help="teacher trajectories per prompt (default 8)")
    tr.add_argument("--size", type=int, default=64, help="image side of the trajectories (default 64; a "
                    "multiple of 16)")  # fmt: skip
    tr.set_defaults(handler=_cmd_transformer, uses_torch=True)

    te = kinds.add_parser("text-encoder", help="smaller Qwen3 encoder trained on the teacher's prompt features")
    _common(te, steps=2000, batch=32, lr=3e-3)
    te.add_argument("--layers", type=int, required=True, help="decoder layers of the student")
    te.add_argument("--hidden", type=int, required=True, help="hidden size of the student")
    te.add_argument("--intermediate", type=int, default=0, help="MLP width (default: twice --hidden)")
    te.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    te.add_argument("--kv-heads", type=int, default=1, help="key/value heads (default 1)")
    te.set_defaults(handler=_cmd_text_encoder, uses_torch=True)
