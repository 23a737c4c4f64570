from __future__ import annotations

import torch

from zimage_edge.model.guard import install_fp16_guard
from zimage_edge.model.toy import build_toy_pipeline


def _overflow(_module, _inputs, output):
    # Simulates the fp16 overflow of a real Qwen3/Z-Image residual stream on an sm_75 card.
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = hidden * 1e6
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _run(text_encoder) -> torch.Tensor:
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        return text_encoder(input_ids=ids).last_hidden_state


def test_unguarded_fp16_overflows_and_the_guard_keeps_it_finite() -> None:
    text_encoder = build_toy_pipeline("tiny", seed=0).text_encoder.to(torch.float16)
    text_encoder.layers[0].register_forward_hook(_overflow)
    assert not torch.isfinite(_run(text_encoder)).all()

    handles = install_fp16_guard(text_encoder)
    assert len(handles) == len(text_encoder.layers)
    assert torch.isfinite(_run(text_encoder)).all()

    for handle in handles:
        handle.remove()
    assert not torch.isfinite(_run(text_encoder)).all()


def test_guard_covers_every_transformer_block() -> None:
    transformer = build_toy_pipeline("tiny", seed=0).transformer
    blocks = [m for m in transformer.modules() if type(m).__name__ == "ZImageTransformerBlock"]
    assert len(install_fp16_guard(transformer)) == len(blocks) > 0


def test_guard_leaves_fp32_untouched() -> None:
    text_encoder = build_toy_pipeline("tiny", seed=0).text_encoder
    before = _run(text_encoder)
    install_fp16_guard(text_encoder)
    assert torch.equal(before, _run(text_encoder))
