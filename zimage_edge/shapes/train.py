"""Training the shapes model: first the VAE (reconstruction), then the transformer and the text encoder
with the flow-matching objective of Z-Image-Turbo's scheduler.

The scheduler integrates ``x <- x + (sigma_next - sigma) * v`` with ``v = -transformer(x, 1 - sigma)``
on ``x_sigma = sigma * noise + (1 - sigma) * x0``, so the transformer is trained to output
``x0 - noise`` at ``t = 1 - sigma``, with sigma drawn through the same shift (3.0) the scheduler
applies at inference. Latents are normalised with the VAE's ``shift_factor`` and ``scaling_factor``,
measured on the data after the VAE is trained, as the pipeline expects.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from zimage_edge.model.saving import save_pipeline
from zimage_edge.model.toy import SCHEDULER_CONFIG, ToySize, build_toy_pipeline, toy_vae
from zimage_edge.shapes.data import IMAGE_SIZE, MARKER, all_scenes, dataset
from zimage_edge.shapes.evaluate import PROMPT_TOKENS, draw_scenes, score

log = logging.getLogger(__name__)

SHAPES_SIZE = ToySize(
    dim=96, n_layers=4, n_refiner_layers=1, n_heads=2, axes_dims=(16, 16, 16),
    text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=128,
    vae_channels=32,  # unused: build_pipeline replaces the VAE with a narrower one
)  # fmt: skip
# The VAE's first (full-resolution) stage is the costliest on CPU: 16 channels there, 32 below.
VAE_CHANNELS = (16, 32, 32, 32)
VAE_GROUPS = 8
SHIFT = float(SCHEDULER_CONFIG["shift"])

Report = Callable[[str, int, int, float], None]  # (stage, step, steps, loss)


def held_out_captions(every: int = 9) -> tuple[str, ...]:
    """A fixed tenth of the captions (every 9th of the 90): each shape, color and background still
    appears in training in other combinations."""
    return tuple(scene.caption for scene in all_scenes()[::every])


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    images_per_scene: int = 60
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 3e-3
    transformer_steps: int = 4000
    transformer_batch: int = 64
    transformer_lr: float = 1e-3
    eval_seeds: tuple[int, ...] = (1000,)
    # Captions never shown in training, to measure whether the model composes shape, color and
    # background it has seen only in other combinations.
    held_out: tuple[str, ...] = field(default_factory=held_out_captions)


def build_pipeline(seed: int) -> Any:
    """The shapes model's architecture with fresh weights (real classes, small sizes)."""
    pipe = build_toy_pipeline(SHAPES_SIZE, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        pipe.vae = toy_vae(VAE_CHANNELS, VAE_GROUPS)
    return pipe


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(pipe: Any, images: np.ndarray, config: TrainConfig, report: Report | None = None) -> list[float]:
    vae = pipe.vae.train()
    data = _to_tensor(images)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.vae_lr, total_steps=config.vae_steps, pct_start=0.1
    )
    losses = []
    for step in range(config.vae_steps):
        batch = data[torch.randint(0, len(data), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(reconstruction, batch)
        # A light KL term keeps the latent space smooth without trading away colour fidelity.
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(mse.item())
        if report:
            report("vae", step + 1, config.vae_steps, losses[-1])
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(pipe: Any, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of the images, and set the VAE's shift/scale so they are ~N(0, 1)."""
    data = _to_tensor(images)
    latents = torch.cat([pipe.vae.encode(data[i : i + batch]).latent_dist.mode() for i in range(0, len(data), batch)])
    shift, std = float(latents.mean()), float(latents.std())
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return (latents - shift) / std


def prompt_embeddings(pipe: Any, prompts: list[str]) -> list[torch.Tensor]:
    """The pipeline's own prompt encoding, with gradients (the text encoder trains too)."""
    # A copy: ZImagePipeline.encode_prompt writes the chat-templated prompts back into the list it is
    # given, so reusing one list would template it again on every step until the truncated
    # prompts no longer contain the caption at all.
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts), device=torch.device("cpu"), do_classifier_free_guidance=False,
        max_sequence_length=PROMPT_TOKENS,
    )  # fmt: skip
    return list(embeds)


def flow_matching_loss(
    pipe: Any, latents: torch.Tensor, caption_ids: torch.Tensor, prompts: list[str], generator: torch.Generator
) -> torch.Tensor:
    embeds = prompt_embeddings(pipe, prompts)
    noise = torch.randn(latents.shape, generator=generator)
    u = torch.rand(len(latents), generator=generator)
    sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # the scheduler's static shift
    s = sigma.view(-1, 1, 1, 1)
    noisy = s * noise + (1 - s) * latents
    out = pipe.transformer(
        list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, [embeds[i] for i in caption_ids.tolist()], return_dict=False
    )[0]
    prediction = torch.stack(out).squeeze(2)
    return F.mse_loss(prediction, latents - noise)


def train_transformer(
    pipe: Any, latents: torch.Tensor, caption_ids: torch.Tensor, prompts: list[str], config: TrainConfig,
    *, report: Report | None = None,
) -> list[float]:  # fmt: skip
    pipe.transformer.train()
    pipe.text_encoder.train()
    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.transformer_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.transformer_lr, total_steps=config.transformer_steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    losses = []
    for step in range(config.transformer_steps):
        index = torch.randint(0, len(latents), (config.transformer_batch,), generator=generator)
        loss = flow_matching_loss(pipe, latents[index], caption_ids[index], prompts, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if report:
            report("transformer", step + 1, config.transformer_steps, losses[-1])
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return losses


def train_shapes(out_dir: Path, config: TrainConfig | None = None, report: Report | None = None) -> dict[str, Any]:
    """The whole recipe; writes the pipeline (bf16 weights) and its marker file atomically."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    unknown = set(config.held_out) - {s.caption for s in all_scenes()}
    if unknown:
        raise ValueError(f"held-out captions not of the trained form: {sorted(unknown)}")
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    pipe = build_pipeline(config.seed)
    pipe.set_progress_bar_config(disable=True)
    images, scenes = dataset(config.images_per_scene, config.seed)
    keep = [i for i, s in enumerate(scenes) if s.caption not in config.held_out]
    images, scenes = images[keep], [scenes[i] for i in keep]
    vae_losses = train_vae(pipe, images, config, report)
    latents = encode_latents(pipe, images)
    prompts = sorted({s.caption for s in scenes})
    caption_ids = torch.tensor([prompts.index(s.caption) for s in scenes])
    tr_losses = train_transformer(pipe, latents, caption_ids, prompts, config, report=report)
    with torch.no_grad():
        drawn = draw_scenes(pipe, config.eval_seeds)
    held_out = [(scene, image) for scene, image in drawn if scene.caption in config.held_out]
    accuracy = score(drawn)
    accuracy_held_out = score(held_out) if held_out else None
    summary = {
        "task": "shapes",
        "image_size": IMAGE_SIZE,
        "prompt_form": "a {color} {shape} on a {background} background",
        "config": asdict(config),
        "vae_mse_first_last": [vae_losses[0], float(np.mean(vae_losses[-50:]))],
        "flow_loss_first_last": [tr_losses[0], float(np.mean(tr_losses[-50:]))],
        "adherence": accuracy,
        "held_out": list(config.held_out),
        "adherence_held_out": accuracy_held_out,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }

    def marker(directory: Path) -> None:
        (directory / MARKER).write_text(json.dumps(summary, indent=2) + "\n")

    save_pipeline(pipe, out_dir, marker)
    return summary
