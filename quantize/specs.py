"""Parameter counts of a pipeline: what the planner multiplies by bytes per weight.

Torch-free data; ``spec_from_pipeline`` counts a loaded pipeline (the agent's request budget uses it).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ComponentSpec:
    total_params: int
    quantizable_params: int  # nn.Linear weights not excluded by the recipe's patterns
    largest_unit_params: int  # the biggest block: the unit of sequential offload

    @property
    def other_params(self) -> int:
        return self.total_params - self.quantizable_params


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and the dimensions the activation model needs."""

    name: str
    transformer: ComponentSpec
    text_encoder: ComponentSpec
    vae: ComponentSpec
    transformer_dim: int
    text_hidden: int
    text_layers: int
    vae_full_res_channels: int  # channels of the VAE decoder's last, full-resolution stage

    def component(self, name: str) -> ComponentSpec:
        spec: ComponentSpec = getattr(self, name)
        return spec


# Counted on the meta device from the published configs (transformer: dim 3840, 30+2+2 layers;
# Qwen3-4B: hidden 2560, 36 layers, vocab 151936; Flux VAE: 128/256/512/512 channels) with the
# exclusion patterns of quantize.variants.
Z_IMAGE_TURBO = ModelSpec(
    name="Tongyi-MAI/Z-Image-Turbo",
    transformer=ComponentSpec(6_154_908_736, 6_142_033_920, 180_910_336),
    text_encoder=ComponentSpec(4_022_468_096, 3_633_315_840, 388_956_160),
    vae=ComponentSpec(83_819_683, 2_097_152, 49_545_475),
    transformer_dim=3840,
    text_hidden=2560,
    text_layers=36,
    vae_full_res_channels=128,
)


def spec_from_dir(root: Path, name: str, counts: Mapping[str, tuple[int, int]]) -> ModelSpec:
    """The spec of a pipeline directory from its component configs and (params, quantized params) per
    weight component, as a build counted them or an artifact's manifest records them. The offload
    unit is not known from counts alone (0)."""

    def config(component: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((Path(root) / component / "config.json").read_text())
        return data

    def component(key: str) -> ComponentSpec:
        params, quantized = counts[key]
        return ComponentSpec(params, quantized, 0)

    return ModelSpec(
        name=name,
        transformer=component("transformer"),
        text_encoder=component("text_encoder"),
        vae=component("vae"),
        transformer_dim=int(config("transformer")["dim"]),
        text_hidden=int(config("text_encoder")["hidden_size"]),
        text_layers=int(config("text_encoder")["num_hidden_layers"]),
        vae_full_res_channels=int(config("vae")["block_out_channels"][0]),
    )


# The real transformer's config (``ZImageTransformer2DModel``), for benchmarks that build it with random
# weights on the meta device or a GPU instead of downloading the checkpoint.
Z_IMAGE_TURBO_TRANSFORMER_CONFIG: dict[str, Any] = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}  # fmt: skip


def count_component(module: Any, exclude: tuple[str, ...] = ()) -> ComponentSpec:
    """Count a torch module (real or on the meta device)."""
    from torch import nn

    total = sum(p.numel() for p in module.parameters())
    quantizable = sum(
        m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatch(name, pattern) for pattern in exclude)
    )
    largest = 0
    for child in module.children():
        units = list(child) if isinstance(child, nn.ModuleList) else [child]
        for unit in units:
            largest = max(largest, sum(p.numel() for p in unit.parameters()))
    return ComponentSpec(total, quantizable, largest)


def spec_from_pipeline(pipe: Any, name: str) -> ModelSpec:
    """The spec of a loaded ``ZImagePipeline`` with the default exclusion patterns."""
    from quantize.variants import TEXT_ENCODER_EXCLUDE, TRANSFORMER_EXCLUDE

    vae_channels = pipe.vae.config.block_out_channels
    return ModelSpec(
        name=name,
        transformer=count_component(pipe.transformer, TRANSFORMER_EXCLUDE),
        text_encoder=count_component(pipe.text_encoder, TEXT_ENCODER_EXCLUDE),
        vae=count_component(pipe.vae),
        transformer_dim=int(pipe.transformer.config.dim),
        text_hidden=int(pipe.text_encoder.config.hidden_size),
        text_layers=int(pipe.text_encoder.config.num_hidden_layers),
        vae_full_res_channels=int(vae_channels[0]),
    )
