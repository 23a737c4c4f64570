"""Every constant of the planner's memory model, each with where it came from.

Two kinds of numbers live here: counts derived from the architecture (how many tensors are alive at
once) and allowances for the runtime. ``benchmarks/planner_calibration.py`` measures the activation
factors of a model on the device it runs on and prints them next to these values; replace a number
only with such a measurement behind it.
"""

from __future__ import annotations

from zimage_edge.device import GIB

# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's first blocks. torch 2.x on
# Ampere/Ada holds roughly 300-600 MiB before any model weight; we take the upper end.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)

# Fraction of the budget kept free for allocator fragmentation and transient copies while loading.
HEADROOM_FRACTION = 0.06

# Transformer activations at the peak of one block, per token and per model-dim element, in units of
# the compute dtype. Counted from the block: x, norm(x), q/k/v, attention output and the 8/3-wide
# SwiGLU (w1, w3, product) = 1 + 1 + 3 + 1 + 3 * 8/3 = 14 live tensors, plus the adaLN-modulated copy
# and the residual = 16. Assumes fused SDPA (flash / memory-efficient), never the tokens^2 matrix.
TRANSFORMER_ACT_FACTOR = 16.0

# Prompt tokens the transformer sees: the templated prompt, padded to a multiple of 32 after the
# max_sequence_length padding is dropped. 256 covers prompts up to ~230 tokens.
CAPTION_TOKENS = 256

# VAE decode, per output pixel and per channel of the decoder's full-resolution stage: GroupNorm in
# and out, two conv outputs, the residual and the upsampled input (6 tensors), doubled for conv
# workspaces = 12. For the Flux VAE (128 channels) at 1024x1024 in bf16 this gives 3 GiB.
VAE_ACT_FACTOR = 12.0

# Text encoder: the pipeline asks for every hidden state (it uses the second to last), so
# (layers + 1) tensors of (tokens x hidden) stay alive, plus ~8 for the running layer (q/k/v,
# attention output, the ~3.8x-wide MLP).
TEXT_ENCODER_LIVE_FACTOR = 8.0

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
