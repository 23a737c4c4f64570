"""Generation: validated requests in, images and timings out.

Prompt encoding, the denoising loop and VAE decoding are timed separately (the text encoder is a
separate budget on small devices). Every image has its own CPU generator seeded ``seed + i``, so an
image is the same whether it is drawn alone or inside a micro-batch, and on any device.

Cancellation is cooperative: the pipeline calls back after every denoising step, and the callback
raises ``GenerationCancelled`` when the caller's event is set, so work stops within one step. In a
micro-batch each request may have its own event: a cancelled request's rows leave the batch at the
next step (without CFG; with CFG the rows stay and their result is dropped) while the others go on.
This is blocking work: callers on an event loop run it in their executor.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from zimage_edge.errors import GenerationCancelled
from zimage_edge.request import MAX_SEED, GenerationRequest

# Called with (steps done, total steps) after each denoising step.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Timings:
    encode_sec: float
    denoise_sec: float
    decode_sec: float
    total_sec: float
    steps: int
    batch_images: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "encode_sec": round(self.encode_sec, 6),
            "denoise_sec": round(self.denoise_sec, 6),
            "decode_sec": round(self.decode_sec, 6),
            "total_sec": round(self.total_sec, 6),
            "steps": self.steps,
            "batch_images": self.batch_images,
        }


@dataclass
class GenerationResult:
    """The images of one request, the seed of each, shared batch timings and the final latents."""

    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    timings: Timings
    latents: torch.Tensor  # float32, CPU, (num_images, 16, H/8, W/8): what the quality gate compares
    cancelled: bool = False  # left its micro-batch early; no images


def resolve_seeds(request: GenerationRequest) -> list[int]:
    """Seeds for each image of ``request``: ``seed + i``, or fresh random ones when no seed was given."""
    base = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - request.num_images)
    return [base + i for i in range(request.num_images)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_batch(
    pipe: Any,
    requests: Sequence[GenerationRequest],
    *,
    on_step: ProgressFn | None = None,
    cancels: Sequence[threading.Event | None] | None = None,
) -> list[GenerationResult]:
    """Run compatible requests (equal ``batch_key``) as one pipeline call.

    ``cancels`` has one optional event per request and removes just that request (its result comes
    back with ``cancelled=True``); when every request is cancelled the batch stops
    (``GenerationCancelled``).
    """
    if not requests:
        return []
    key = requests[0].batch_key()
    if any(r.batch_key() != key for r in requests):
        raise ValueError("requests in one batch must share width, height, steps, guidance and max_sequence_length")
    if cancels is not None and len(cancels) != len(requests):
        raise ValueError("cancels needs one entry per request")
    first = requests[0]
    seeds = [resolve_seeds(r) for r in requests]
    prompts = [r.prompt for r in requests for _ in range(r.num_images)]
    negatives = [r.negative_prompt for r in requests for _ in range(r.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for group in seeds for s in group]
    # rows[i] is the request index of latent row i; rows leave when their request is cancelled.
    rows = [index for index, r in enumerate(requests) for _ in range(r.num_images)]
    device = pipe._execution_device

    def cancelled_requests() -> set[int]:
        if cancels is None:
            return set()
        return {i for i, event in enumerate(cancels) if event is not None and event.is_set()}

    def check_cancel(step: int) -> set[int]:
        dead = cancelled_requests()
        if len(dead) == len(requests):
            raise GenerationCancelled(step, first.steps)
        return dead

    def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(index + 1, first.steps)
        dead = check_cancel(index + 1)
        keep = [k for k, owner in enumerate(rows) if owner not in dead]
        if len(keep) == len(rows) or first.uses_cfg:
            return {}
        rows[:] = [rows[k] for k in keep]
        return {"latents": tensors["latents"][keep], "prompt_embeds": [tensors["prompt_embeds"][k] for k in keep]}

    started = time.perf_counter()
    check_cancel(0)
    # no_grad, not inference_mode: quanto int4 kernels are autograd Functions that reject inference tensors.
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negatives if first.uses_cfg else None,
            do_classifier_free_guidance=first.uses_cfg,
            device=device,
            max_sequence_length=first.max_sequence_length,
        )
        _sync(device)
        encoded = time.perf_counter()
        check_cancel(0)
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds if first.uses_cfg else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
            max_sequence_length=first.max_sequence_length,
        ).images
        _sync(device)
        denoised = time.perf_counter()
        check_cancel(first.steps)
        dead = cancelled_requests()
        live = [k for k, owner in enumerate(rows) if owner not in dead]
        images = decode_latents(pipe, latents[live]) if live else []
        _sync(device)
    finished = time.perf_counter()

    timings = Timings(
        encode_sec=encoded - started,
        denoise_sec=denoised - encoded,
        decode_sec=finished - denoised,
        total_sec=finished - started,
        steps=first.steps,
        batch_images=len(prompts),
    )
    final = latents.detach().float().cpu()
    live_rows = [rows[k] for k in live]
    results = []
    for index, (request, group) in enumerate(zip(requests, seeds, strict=True)):
        picks = [j for j, owner in enumerate(live_rows) if owner == index]
        results.append(
            GenerationResult(
                request=request,
                images=[images[j] for j in picks],
                seeds=group,
                timings=timings,
                latents=final[[live[j] for j in picks]],
                cancelled=index in dead,
            )
        )
    return results


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The pipeline's own VAE decode: undo the Flux latent scale/shift, decode, convert to PIL."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(scaled, return_dict=False)[0]
    images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


def generate(
    pipe: Any,
    request: GenerationRequest,
    *,
    on_step: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Generate the images of one request; ``cancel`` stops it (``GenerationCancelled``)."""
    return generate_batch(pipe, [request], on_step=on_step, cancels=[cancel])[0]
