"""The ``generate`` subcommand: draw with an artifact, a diffusers directory or the shipped shapes model.

Importing this module is torch-free. Defaults are the generation contract's (``GenerationRequest``),
and a model's own size (the shapes model draws at 64x64) when no size is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zimage_edge.errors import UsageError
from zimage_edge.request import GenerationRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The request fields the command line sets, with their flags' types.
_FIELDS = {
    "negative_prompt": str, "width": int, "height": int, "steps": int, "guidance": float, "seed": int,
    "num_images": int, "max_sequence_length": int,
}  # fmt: skip


def _default(name: str) -> Any:
    return GenerationRequest.model_fields[name].default


def _cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from quantize.identity import default_size
    from zimage_edge.request import describe_validation_error
    from zimage_edge.shapes import PRETRAINED

    model = args.model if args.model is not None else str(PRETRAINED)
    given: dict[str, Any] = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    # Unless given, a model draws at its own size (the shapes model at 64x64).
    native = default_size(Path(model))
    sizes: dict[str, Any] = {name: native for name in ("width", "height") if name not in given}
    try:
        request = GenerationRequest(prompt=args.prompt, **sizes, **given)
    except ValidationError as exc:
        raise UsageError(f"invalid request: {describe_validation_error(exc)}") from exc
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"output {output} must end in .png, .jpg or .webp")

    from tqdm import tqdm

    from quantize.models import load_model
    from quantize.signing import load_public_keys
    from zimage_edge.model.generate import generate

    trusted = load_public_keys(args.trusted_key)
    model_handle = load_model(model, trusted=trusted, allow_download=args.allow_download)
    loaded = model_handle.pipeline
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


def _describe_shapes(model_dir: Path, prompt: str, images: list[Any]) -> None:
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the generate subcommand."""
    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "--model", default=None, help="artifact, diffusers directory or Hugging Face id (default: the shapes model)"
    )
    gen.add_argument("-o", "--output", default="out.png", help="image path (.png/.jpg/.webp; default out.png)")
    helps = {
        "negative_prompt": "what to avoid (needs --guidance > 0)",
        "width": f"pixels, a multiple of 16 (default: the model's own size, else {_default('width')})",
        "height": f"pixels, a multiple of 16 (default: the model's own size, else {_default('height')})",
        "steps": f"denoising steps (default {_default('steps')}, Turbo)",
        "guidance": f"CFG scale (default {_default('guidance')}, Turbo: no CFG)",
        "seed": "seed (default random)",
        "num_images": f"images to draw (default {_default('num_images')})",
        "max_sequence_length": f"prompt tokens kept (default {_default('max_sequence_length')})",
    }
    for name, kind in _FIELDS.items():
        gen.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=helps[name])
    gen.add_argument("--allow-download", action="store_true", help="fetch a Hugging Face id not in the cache")
    gen.add_argument(
        "--trusted-key", action="append", help="public key (PEM); only artifacts it signed load (repeatable)"
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=_cmd_generate, uses_torch=True)
