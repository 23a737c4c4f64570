"""A distilled text encoder: a smaller ``Qwen3Model`` whose hidden states are projected to the caption
feature size of the transformer it feeds.

``ZImagePipeline`` reads ``hidden_states[-2]`` of its text encoder and hands it to the transformer,
whose ``cap_feat_dim`` is the teacher encoder's hidden size. The student is narrower, so every hidden
state it returns passes through one learned linear projection; the pipeline, the tokenizer and the
chat template stay as they are. ``save_pretrained`` records this module's path in
``model_index.json``; diffusers resolves such a class from the modules already imported, which is why
``zimage_edge.model.loading`` imports this one before it loads a pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3Config, Qwen3Model

# diffusers finds the loading method of a component by looking up its base classes by name in the
# component's module; PreTrainedModel must be visible here for it to call ``from_pretrained``.
__all__ = ["CAPTION_DIM_KEY", "CaptionProjectedQwen3Model", "PreTrainedModel"]

# The config entry that holds the size of the projected features (the teacher's hidden size).
CAPTION_DIM_KEY = "caption_feature_dim"


class CaptionProjectedQwen3Model(Qwen3Model):
    """``Qwen3Model`` plus ``caption_projection`` (hidden size -> ``config.caption_feature_dim``)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        self.caption_projection = nn.Linear(config.hidden_size, int(getattr(config, CAPTION_DIM_KEY)))
        self.post_init()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = self.caption_projection(out.last_hidden_state)
        if out.hidden_states is not None:
            out.hidden_states = tuple(self.caption_projection(h) for h in out.hidden_states)
        return out


def student_text_config(teacher: Qwen3Config, *, hidden: int, layers: int, intermediate: int, heads: int,
                        kv_heads: int) -> Qwen3Config:  # fmt: skip
    """The student's config: the teacher's vocabulary, positions and rope, smaller widths and depth."""
    data = teacher.to_dict()
    for key in ("architectures", "layer_types", "transformers_version", "dtype", "torch_dtype"):
        data.pop(key, None)
    data.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_window_layers=layers,
    )
    data[CAPTION_DIM_KEY] = int(teacher.hidden_size)
    return Qwen3Config(**data)


def caption_features(encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the pipeline takes from a text encoder: ``hidden_states[-2]`` (padded; ``mask`` says where)."""
    return encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
