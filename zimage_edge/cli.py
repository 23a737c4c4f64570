"""The ``zimage-edge`` command: one parser, thin subcommands that call library functions.

Subcommand modules are imported lazily, so torch-free commands never load the model stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from zimage_edge import __version__

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


def _cmd_toy_model(args: argparse.Namespace) -> int:
    from zimage_edge.model.toy import save_toy_model

    out = save_toy_model(Path(args.out_dir), size=args.size, seed=args.seed)
    print(f"toy model ({args.size}, seed {args.seed}) written to {out}")
    print("note: a toy model has random weights and draws noise; it exercises the real code paths")
    return 0


def _cmd_train_shapes(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_edge.shapes.train import TrainConfig, held_out_captions, train_shapes

    config = TrainConfig(
        seed=args.seed,
        images_per_scene=args.images_per_scene,
        vae_steps=args.vae_steps,
        transformer_steps=args.transformer_steps,
        held_out=held_out_captions() if args.hold_out else (),
    )
    if Path(args.out_dir).exists():
        raise UsageError(f"{args.out_dir} already exists")
    bars: dict[str, tqdm] = {}

    def report(stage: str, step: int, steps: int, loss: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=steps, desc=f"train {stage}", unit="step", disable=args.quiet)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == steps:
            bar.close()

    summary = train_shapes(Path(args.out_dir), config, report)
    print(json.dumps(summary["adherence"]))
    print(f"trained in {summary['train_seconds']} s; written to {args.out_dir}")
    return 0


def _cmd_device(args: argparse.Namespace) -> int:
    from zimage_edge.device import detect_device, dtype_policy

    facts = detect_device()
    print(json.dumps({"device": facts.to_dict(), "policy": dtype_policy(facts).to_dict()}, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from zimage_edge.request import GenerationRequest, describe_validation_error
    from zimage_edge.shapes import PRETRAINED
    from zimage_edge.shapes.data import trained_size

    model = args.model if args.model is not None else str(PRETRAINED)
    # Unless given: the shapes model draws at its training size, other models at the request's default.
    native = trained_size(model)
    given = {"width": args.width, "height": args.height}
    sizes = {name: native if value is None else value for name, value in given.items()}
    try:
        request = GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            **{name: value for name, value in sizes.items() if value is not None},
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            num_images=args.num_images,
            max_sequence_length=args.max_sequence_length,
        )
    except ValidationError as exc:
        raise UsageError(f"invalid request: {describe_validation_error(exc)}") from exc
    output = Path(args.output)
    if output.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
        raise UsageError(f"output {output} must end in .png, .jpg or .webp")

    from tqdm import tqdm

    from quantize.artifact import load_model
    from quantize.signing import load_public_keys
    from zimage_edge.model.generate import generate

    loaded = load_model(model, trusted=load_public_keys(args.trusted_key), allow_download=args.allow_download)
    print(
        f"loaded {model} in {loaded.stats.seconds:.2f}s on {loaded.device} ({loaded.policy.dtype}); "
        f"rss +{loaded.stats.rss_delta / 2**20:.0f} MiB"
    )
    with tqdm(total=request.steps, desc="denoising", unit="step", disable=args.quiet) as bar:

        def on_step(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        result = generate(loaded.pipe, request, on_step=on_step)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [output]
        if len(result.images) == 1
        else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(result.images))]
    )
    for image, path in zip(result.images, paths, strict=True):
        image.save(path)
    t = result.timings
    print(f"encode {t.encode_sec:.3f}s, denoise {t.denoise_sec:.3f}s ({t.steps} steps), decode {t.decode_sec:.3f}s")
    for path, seed in zip(paths, result.seeds, strict=True):
        print(f"wrote {path} (seed {seed})")
    _describe_shapes(loaded.path, request.prompt, result.images)
    return 0


def _describe_shapes(model_dir: Path, prompt: str, images: list) -> None:
    """For the shapes model: what each image shows, read back from its pixels."""
    import numpy as np

    from zimage_edge.shapes.data import MARKER, parse_caption
    from zimage_edge.shapes.metric import read_image

    if not (Path(model_dir) / MARKER).is_file():
        return
    asked = parse_caption(prompt)
    for image in images:
        seen = read_image(np.asarray(image.convert("RGB")))
        verdict = ""
        if asked is not None:
            right = (seen.color, seen.shape, seen.background) == (asked.color, asked.shape, asked.background)
            verdict = " (as asked)" if right else " (not as asked)"
        print(f"the image shows: a {seen.color} {seen.shape} on a {seen.background} background{verdict}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    toy = sub.add_parser("toy-model", help="write a random-weight Z-Image pipeline of the real architecture")
    toy.add_argument("out_dir", help="directory to create (must not exist)")
    toy.add_argument("--size", default="tiny", choices=["tiny", "medium"], help="model size (default tiny)")
    toy.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    toy.set_defaults(handler=_cmd_toy_model)

    shapes = sub.add_parser("train-shapes", help="train the small shapes model of the real architecture")
    shapes.add_argument("out_dir", help="directory to create (must not exist)")
    shapes.add_argument("--seed", type=int, default=0, help="seed of data and weights (default 0)")
    shapes.add_argument("--images-per-scene", type=int, default=60, help="training images per scene (default 60)")
    shapes.add_argument("--vae-steps", type=int, default=1000, help="VAE steps (default 1000)")
    shapes.add_argument("--transformer-steps", type=int, default=4000, help="transformer steps (default 4000)")
    shapes.add_argument(
        "--hold-out",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every 9th caption out of training and score it apart (default: on)",
    )
    shapes.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    shapes.set_defaults(handler=_cmd_train_shapes)

    device = sub.add_parser("device", help="show the detected device and the dtype policy for it")
    device.set_defaults(handler=_cmd_device)

    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "--model", default=None, help="artifact, diffusers directory or Hugging Face id (default: the shapes model)"
    )
    gen.add_argument("-o", "--output", default="out.png", help="image path (.png/.jpg/.webp; default out.png)")
    gen.add_argument("--negative-prompt", default="", help="what to avoid (needs --guidance > 0)")
    gen.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the model's, 1024)")
    gen.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the model's, 1024)")
    gen.add_argument("--steps", type=int, default=8, help="denoising steps (default 8, Turbo)")
    gen.add_argument("--guidance", type=float, default=0.0, help="CFG scale (default 0.0, Turbo)")
    gen.add_argument("--seed", type=int, default=None, help="seed (default random)")
    gen.add_argument("--num-images", type=int, default=1, help="images to draw (default 1)")
    gen.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens kept (default 512)")
    gen.add_argument("--allow-download", action="store_true", help="fetch a Hugging Face id not in the cache")
    gen.add_argument(
        "--trusted-key", action="append", help="public key (PEM); only artifacts it signed load (repeatable)"
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=_cmd_generate)

    from edge_agent.cli import register as register_agent
    from quantize.cli import register as register_quantize

    register_quantize(sub)
    register_agent(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"zimage-edge {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"zimage-edge {args.command}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # ModelLoadError and other failures with a message for the user
        print(f"zimage-edge {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
