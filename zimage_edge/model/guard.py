"""The fp16 activation guard for GPUs without bf16 (sm < 80, e.g. T4).

Z-Image-Turbo was trained in bf16, whose range matches fp32. In fp16 (max 65504) the residual stream
of the transformer blocks and of the Qwen3 decoder layers can overflow to inf, which turns into NaN
latents and black images. The guard clamps each block's output back into the finite fp16 range, the
same remedy transformers applies to T5 in fp16 (``clamp_value = finfo(fp16).max - 1000``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# Headroom below fp16's max so the next residual add does not overflow straight away (T5's choice).
CLAMP_HEADROOM = 1000.0

# The classes whose outputs carry the residual stream: Z-Image's transformer block and Qwen3's layer.
GUARDED_BLOCK_NAMES = frozenset({"ZImageTransformerBlock", "Qwen3DecoderLayer"})


def _clamp(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - CLAMP_HEADROOM
        return torch.nan_to_num(value, nan=0.0, posinf=limit, neginf=-limit).clamp_(-limit, limit)
    if isinstance(value, tuple):
        return tuple(_clamp(v) for v in value)
    return value


def _hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    return _clamp(output)


def install_fp16_guard(model: nn.Module) -> list[RemovableHandle]:
    """Clamp the outputs of every residual block in ``model``; returns the hook handles."""
    return [
        module.register_forward_hook(_hook)
        for module in model.modules()
        if type(module).__name__ in GUARDED_BLOCK_NAMES
    ]
