"""The quality gate: a quantized pipeline against the full-precision reference, on fixed prompts and seeds.

Metrics per sample: image PSNR and SSIM (scikit-image) and the relative L2 distance of the final
latents (before the VAE, so it isolates what quantizing the transformer and text encoder did).
The gate uses the worst sample: minimum PSNR and SSIM, maximum latent distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from quantize.calibration import QUALITY_GATE_SIDE
from quantize.manifest import QualityReport
from quantize.variants import QualityThresholds
from zimage_edge.errors import ZimageEdgeError
from zimage_edge.model.generate import generate
from zimage_edge.request import DEFAULT_STEPS, GenerationRequest

# Mixed subjects and styles for real checkpoints; the first is in the form the shapes model knows.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen on a wooden table, studio photo",
    "a green triangle on a white background",
)
# Identical images have infinite PSNR; JSON has no infinity, and 100 dB is far beyond 8-bit precision.
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class QualitySpec:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0,)
    width: int = QUALITY_GATE_SIDE
    height: int = QUALITY_GATE_SIDE
    steps: int = DEFAULT_STEPS

    def requests(self) -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt=p, seed=s, width=self.width, height=self.height, steps=self.steps)
            for p in self.prompts
            for s in self.seeds
        ]


@dataclass
class Sample:
    image: np.ndarray  # uint8 HxWx3
    latents: torch.Tensor


@dataclass
class Comparison:
    psnr_db: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    latent_rel_l2: list[float] = field(default_factory=list)


def run_samples(pipe: Any, spec: QualitySpec) -> list[Sample]:
    samples = []
    for request in spec.requests():
        result = generate(pipe, request)
        samples.append(Sample(np.asarray(result.images[0].convert("RGB"), dtype=np.uint8), result.latents[0]))
    return samples


def compare(reference: Sequence[Sample], candidate: Sequence[Sample]) -> Comparison:
    out = Comparison()
    for ref, cand in zip(reference, candidate, strict=True):
        if np.array_equal(ref.image, cand.image):
            psnr = PSNR_CAP_DB
        else:
            psnr = min(PSNR_CAP_DB, float(peak_signal_noise_ratio(ref.image, cand.image, data_range=255)))
        out.psnr_db.append(psnr)
        out.ssim.append(float(structural_similarity(ref.image, cand.image, channel_axis=2, data_range=255)))
        norm = float(torch.linalg.vector_norm(ref.latents))
        diff = float(torch.linalg.vector_norm(cand.latents - ref.latents))
        out.latent_rel_l2.append(diff / norm if norm > 0 else math.inf)
    return out


def failures(
    comparison: Comparison, thresholds: QualityThresholds, adherence: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """Human-readable reasons the comparison misses its thresholds (empty when it passes).

    ``adherence`` is ``{"reference": ..., "candidate": ...}`` (``Adherence.to_dict()``) for a shapes model.
    """
    reasons = []
    if min(comparison.psnr_db) < thresholds.min_psnr_db:
        reasons.append(f"PSNR {min(comparison.psnr_db):.2f} dB < {thresholds.min_psnr_db} dB")
    if min(comparison.ssim) < thresholds.min_ssim:
        reasons.append(f"SSIM {min(comparison.ssim):.4f} < {thresholds.min_ssim}")
    if max(comparison.latent_rel_l2) > thresholds.max_latent_rel_l2:
        reasons.append(f"latent relative L2 {max(comparison.latent_rel_l2):.4f} > {thresholds.max_latent_rel_l2}")
    if adherence is not None:
        ref, cand = adherence["reference"]["color_accuracy"], adherence["candidate"]["color_accuracy"]
        if ref - cand > thresholds.max_adherence_drop + 1e-9:
            reasons.append(
                f"color accuracy {cand:.3f} is {100 * (ref - cand):.1f} points below the reference's {ref:.3f} "
                f"(> {100 * thresholds.max_adherence_drop:.0f})"
            )
    return reasons


def report(
    comparison: Comparison,
    spec: QualitySpec,
    thresholds: QualityThresholds,
    reference_dtype: str,
    *,
    forced: bool,
    adherence: dict[str, dict[str, Any]] | None = None,
) -> QualityReport:
    """The manifest's quality record; ``adherence`` (shapes model) is recorded as ``shape_adherence``."""
    missed = failures(comparison, thresholds, adherence)
    if missed and not forced:
        raise QualityGateError(missed)
    return QualityReport(
        status="failed_forced" if missed else "passed",
        reason="; ".join(missed) if missed else "all samples within thresholds",
        reference_dtype=reference_dtype,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        prompts=list(spec.prompts),
        seeds=list(spec.seeds),
        psnr_db_mean=round(float(np.mean(comparison.psnr_db)), 3),
        psnr_db_min=round(min(comparison.psnr_db), 3),
        ssim_mean=round(float(np.mean(comparison.ssim)), 5),
        ssim_min=round(min(comparison.ssim), 5),
        latent_rel_l2_max=round(max(comparison.latent_rel_l2), 6),
        thresholds=thresholds.to_dict(),
        extra={"shape_adherence": adherence} if adherence else {},
    )


class QualityGateError(ZimageEdgeError):
    """The variant is below its quality thresholds; nothing was written."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("quality gate failed: " + "; ".join(reasons) + " (use --force to keep it anyway)")
        self.reasons = reasons
