"""Every constant of the planner's memory model, each with where it came from.

Two kinds of numbers live here: activation factors measured by ``benchmarks/planner_calibration.py``
(results in ``benchmarks/results/``), and allowances for the runtime. Run the benchmark on a device
and replace a factor only with such a measurement behind it. A device whose measured peaks differ
from the model gets a ``MemoryCalibration`` fitted from ``zimage-edge bench device`` results
(``zimage-edge plan --calibration``) instead of new constants for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.bench_results import DeviceBenchResults
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


@dataclass(frozen=True)
class MemoryCalibration:
    """One device's measured corrections to the memory model, fitted from ``zimage-edge bench device``.

    ``predicted peak = weights + overhead_bytes + activation_scale * activations``. Both are the
    largest any measured point needed (overhead: memory held once loaded beyond the predicted weights;
    scale: measured activation peak over predicted), so the calibrated model under-predicts none of
    the points it was fitted on. Identity values leave the model as the constants above make it.
    """

    activation_scale: float = 1.0
    overhead_bytes: int = 0
    profile: str = ""
    device: str = ""
    source: str = ""
    points: int = 0

    def describe(self) -> str:
        return (
            f"calibrated on {self.device or self.profile} from {self.source or 'a benchmark'} ({self.points} points): "
            f"activations x{self.activation_scale:.2f}, overhead {self.overhead_bytes / GIB:+.3f} GiB"
        )


def calibration_from_results(results: DeviceBenchResults, source: str = "") -> MemoryCalibration:
    """Fit ``MemoryCalibration`` to a device benchmark's predicted and measured peaks."""
    overheads = [a.load.loaded_bytes - c.predicted.weights_bytes for a in results.artifacts for c in a.cells]
    scales = [
        (c.peak_bytes - a.load.loaded_bytes) / c.predicted.activation_bytes
        for a in results.artifacts
        for c in a.cells
        if c.predicted.activation_bytes > 0
    ]
    if not overheads:
        raise ValueError(f"{source or 'the results'} hold no measured cell to calibrate with")
    return MemoryCalibration(
        # A run whose activations all fit in memory freed before (scale < 0) says nothing about them: keep 1.
        activation_scale=max(scales) if scales and max(scales) > 0 else 1.0,
        overhead_bytes=max(overheads),
        profile=results.profile,
        device=str(results.device.get("name", "")),
        source=source,
        points=len(overheads),
    )
