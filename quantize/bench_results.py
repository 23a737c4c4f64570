"""The per-device benchmark's results file: one contract, written by ``zimage-edge bench device`` and
read by its report, by ``bench compare`` and by the planner's calibration.

Torch-free. Memory figures are bytes the model is responsible for: on a GPU the CUDA allocator's
peak (``torch.cuda.max_memory_allocated``, the CUDA context excluded, as the planner's budget
excludes it), on a CPU the process's peak resident memory above its level just before the artifact
was loaded. Latencies are seconds per pipeline call (prompt encoding, denoising and decoding of the
whole batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RESULTS_FORMAT = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prediction(_Model):
    """The planner's memory model for a cell, with everything resident on the device."""

    weights_bytes: int = Field(description="predicted weight bytes of every component")
    activation_bytes: int = Field(description="predicted activation peak (the larger of transformer and VAE)")
    peak_bytes: int = Field(description="predicted device peak of the resident placement")


class Cell(_Model):
    """One resolution and batch size of one artifact."""

    width: int
    height: int
    batch: int = Field(description="images per pipeline call")
    steps: int
    runs: int = Field(description="timed calls (after one untimed warm-up call)")
    latency_p50_s: float = Field(description="median seconds per call")
    latency_p95_s: float = Field(description="95th percentile seconds per call (nearest rank)")
    images_per_s: float = Field(description="batch / median latency")
    peak_bytes: int = Field(description="peak memory during generation, above the level before loading")
    peak_abs_bytes: int = Field(description="peak memory during generation as the meter reads it")
    predicted: Prediction
    relative_error: float = Field(description="(predicted - measured) / measured peak; negative: under-predicted")


class LoadResult(_Model):
    seconds: float = Field(description="cold load: verification, weights read and assembled, moved to the device")
    peak_bytes: int = Field(description="peak memory while loading, above the level before loading")
    loaded_bytes: int = Field(description="memory held once loaded, above the level before loading")
    baseline_bytes: int = Field(description="the meter's reading just before loading")


class QualityResult(_Model):
    """The artifact against its reference (the bf16 model it was made from), as the quality gate measures."""

    reference: str = Field(description="the reference model directory")
    width: int
    height: int
    steps: int
    samples: int
    psnr_db_mean: float
    psnr_db_min: float
    ssim_mean: float
    ssim_min: float
    latent_rel_l2_max: float
    adherence: dict[str, float | int] | None = Field(
        default=None, description="shapes model: prompt adherence of the artifact, read from the pixels"
    )
    reference_adherence: dict[str, float | int] | None = Field(
        default=None, description="shapes model: the same for the reference"
    )


class ArtifactResult(_Model):
    path: str
    artifact_id: str
    variant: str
    source: str = Field(description="what the artifact was made from (its manifest's source)")
    weight_bytes: int = Field(description="bytes of the artifact's weight files")
    load: LoadResult
    cells: list[Cell]
    quality: QualityResult | None = None

    @property
    def peak_bytes(self) -> int:
        """The highest memory of any phase: loading or generating."""
        return max([self.load.peak_bytes, *(c.peak_bytes for c in self.cells)])


class BenchConfig(_Model):
    resolutions: list[int]
    batches: list[int]
    steps: int
    runs: int
    max_sequence_length: int
    quality: bool
    adherence_scenes: int | None = Field(description="shapes captions scored (None: all)")


class DeviceBenchResults(_Model):
    format: int = RESULTS_FORMAT
    created_at: str
    device: dict[str, Any] = Field(description="DeviceFacts.to_dict() of the machine it ran on")
    policy: dict[str, Any] = Field(description="the dtype policy it ran with")
    threads: dict[str, Any] = Field(description="torch's thread pools as the CPU thread policy set them")
    software: dict[str, str] = Field(description="versions of Python, the project and the libraries")
    memory_meter: str = Field(description="how memory was read")
    profile: str = Field(description="the device profile the results describe (a PROFILES name, or 'detected')")
    budget_bytes: int = Field(description="the planner's device budget for that profile")
    config: BenchConfig
    artifacts: list[ArtifactResult]

    def label(self) -> str:
        return f"{self.profile} ({self.device.get('name', '?')})"


def write_results(results: DeviceBenchResults, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results.model_dump_json(indent=2) + "\n")
    return path


def read_results(path: Path) -> DeviceBenchResults:
    """Parse a results file; ``ValueError`` when it is not one (or of another format)."""
    try:
        results = DeviceBenchResults.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{path} is not a device benchmark results file: {exc}") from exc
    if results.format != RESULTS_FORMAT:
        raise ValueError(f"{path}: results format {results.format} is not {RESULTS_FORMAT}")
    return results
