"""Toy Z-Image pipelines: the real architecture with random weights, built offline.

A toy model draws noise. It exists so that every real code path (diffusers loading, prompt encoding
with the chat template, the 8-step flow-matching loop, the VAE, quantization and serving) runs on a
machine without the 20 GB of real weights. Sizes are data; add a row to ``TOY_SIZES`` for another.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from zimage_edge.model.tokenizer import SPECIAL_TOKENS, build_byte_tokenizer

# The Flux VAE latent statistics used by Z-Image-Turbo; toy VAEs keep them so the pipeline's
# scale/shift arithmetic is the real one.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

# Z-Image-Turbo's scheduler: static shift 3.0, no resolution-dependent shifting.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


@dataclass(frozen=True)
class ToySize:
    """Dimensions of one toy model. ``dim // n_heads`` must equal ``sum(axes_dims)``."""

    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    axes_dims: tuple[int, int, int]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vae_channels: int

    @property
    def text_head_dim(self) -> int:
        return self.text_hidden // self.text_heads


TOY_SIZES: dict[str, ToySize] = {
    # ~0.3 M-param transformer (the timestep MLP has a fixed width, so it cannot shrink further);
    # the whole pipeline is ~4 MB and draws 128x128 in a fraction of a second on CPU.
    "tiny": ToySize(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        axes_dims=(8, 12, 12),
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_kv_heads=1,
        text_intermediate=64,
        vae_channels=32,
    ),
    # ~60 M-param transformer: large enough that file sizes and quantization ratios mean something.
    # int(dim * 8 / 3) % 16 == 0 keeps the feed-forward width packable for int4.
    "medium": ToySize(
        dim=384,
        n_layers=24,
        n_refiner_layers=2,
        n_heads=3,
        axes_dims=(32, 48, 48),
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=768,
        vae_channels=32,
    ),
}

# Same as the real model: axes_lens[0] bounds the padded caption plus image-frame positions.
AXES_LENS = (1536, 512, 512)


def _transformer(size: ToySize) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=size.dim,
        n_layers=size.n_layers,
        n_refiner_layers=size.n_refiner_layers,
        n_heads=size.n_heads,
        n_kv_heads=size.n_heads,
        qk_norm=True,
        cap_feat_dim=size.text_hidden,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=list(size.axes_dims),
        axes_lens=list(AXES_LENS),
    )


def _text_encoder(size: ToySize, vocab_size: int) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        head_dim=size.text_head_dim,
        intermediate_size=size.text_intermediate,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
    )
    return Qwen3Model(config)


def toy_vae(block_channels: tuple[int, int, int, int], norm_groups: int = 32) -> AutoencoderKL:
    """A 16-latent-channel VAE; four blocks give the real VAE's spatial factor of 8; no quant convs,
    like the Flux VAE, and the Flux latent scale/shift (a trained VAE measures its own)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=norm_groups,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_toy_pipeline(size: str | ToySize = "tiny", seed: int = 0) -> ZImagePipeline:
    """Build a fp32 toy pipeline in memory; the same ``(size, seed)`` always gives the same weights.

    ``size`` is a name of ``TOY_SIZES`` or explicit dimensions.
    """
    if isinstance(size, str) and size not in TOY_SIZES:
        raise ValueError(f"unknown toy size {size!r}; choose one of {sorted(TOY_SIZES)}")
    dims = TOY_SIZES[size] if isinstance(size, str) else size
    tokenizer = build_byte_tokenizer()
    vocab_size = 256 + len(SPECIAL_TOKENS)
    # fork_rng keeps the caller's global RNG untouched while seeding every initializer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer(dims)
        text_encoder = _text_encoder(dims, vocab_size)
        vae = toy_vae((dims.vae_channels,) * 4)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )


def save_toy_model(out_dir: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a toy pipeline in the standard diffusers layout, atomically.

    The pipeline is saved into a temporary sibling directory and renamed into place only once
    complete, so an interrupted build never leaves a directory that would load.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = build_toy_pipeline(size, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
