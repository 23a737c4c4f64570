"""Every constant of the planner's memory model, each with where it came from.

Two kinds of numbers live here: activation factors measured by ``benchmarks/planner_calibration.py``
(results in ``benchmarks/results/``), and allowances for the runtime. Run the benchmark on a device
and replace a factor only with such a measurement behind it.
"""

from __future__ import annotations

from zimage_edge.device import GIB

# CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's first blocks. torch 2.x on
# Ampere/Ada holds roughly 300-600 MiB before any model weight; we take the upper end.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)

# Fraction of the budget kept free for allocator fragmentation and transient copies while loading.
HEADROOM_FRACTION = 0.06

# Transformer activations at the peak of one block, per token and per model-dim element, in units of
# the compute dtype. Counting the block's live tensors (x, norm(x), q/k/v, attention output, the
# 8/3-wide SwiGLU, the adaLN-modulated copy, the residual) gives ~16; measured with
# benchmarks/planner_calibration.py (CPU, fp32, 60 M-param toy of the real architecture, fused
# attention): 22.9 between 512 and 1024 px, 19.2 between 1024 and 2048 px. We use the higher.
TRANSFORMER_ACT_FACTOR = 23.0

# Prompt tokens the transformer sees: the templated prompt, padded to a multiple of 32 after the
# max_sequence_length padding is dropped. 256 covers prompts up to ~230 tokens.
CAPTION_TOKENS = 256

# VAE decode, per output pixel and per channel of the decoder's full-resolution stage. Measured with
# benchmarks/planner_calibration.py (CPU, fp32, toy VAE with the real block structure): 4.6 between
# 512 and 1024 px, 5.0 between 1024 and 2048 px; +20% for GPU conv workspaces, which the CPU run
# cannot see. For the Flux VAE (128 channels) at 1024x1024 in bf16 this is 1.5 GiB.
VAE_ACT_FACTOR = 6.0

# Text encoder: the pipeline asks for every hidden state (it uses the second to last), so
# (layers + 1) tensors of (tokens x hidden) stay alive, plus ~8 for the running layer (q/k/v,
# attention output, the ~3.8x-wide MLP).
TEXT_ENCODER_LIVE_FACTOR = 8.0

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The quality gate compares images at 256x256 by default: a sixteenth of the pixels of 1024x1024, so
# the reference and the candidate both run in seconds even where the gate runs on a CPU; a shapes
# model is compared at its own size, and ``zimage-edge quantize --quality-size`` raises it.
QUALITY_GATE_SIDE = 256
