"""The per-device benchmark: for each artifact, its cold load, warm latency by resolution and batch,
peak memory, and quality against its reference, with the planner's prediction beside every peak.

Everything runs in this process, one artifact at a time: the libraries are imported first (so no
artifact's cold load pays for them), freed memory is handed back between phases and each phase
reads its own peak (``quantize.peak_memory.PeakMeter``). The OS file cache is left as it is: a cold
load here reads files the kernel may hold, as a node that just downloaded an artifact does.

The reference of an artifact is the model its manifest names as its source (for the shapes model,
the shipped directory), checked against the source digest the manifest records; its images are drawn
once and every artifact made from it is compared with them, as the quality gate does
(``quantize.quality``), plus prompt adherence read from the pixels for the shapes model.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.bench_results import (
    ArtifactResult,
    BenchConfig,
    Cell,
    DeviceBenchResults,
    LoadResult,
    Prediction,
    QualityResult,
)
from quantize.manifest import Manifest, hash_tree, is_artifact, now_iso, read_manifest, tree_digest
from quantize.planner import Placement, Workload, budget, estimate, placement_bytes
from quantize.profiles import DeviceProfile, get_profile, profile_from_facts
from quantize.specs import spec_from_dir
from quantize.variants import VariantRecipe
from zimage_edge.device import DeviceFacts
from zimage_edge.errors import UsageError
from zimage_edge.request import DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_STEPS, GenerationRequest
from zimage_edge.shapes.data import MARKER as SHAPES_MARKER

# Prompts of the timed calls, one per image of a batch (cycled): the shapes model's caption form, so
# that its timings are those of prompts it knows; prompt length barely changes the cost at Turbo's
# fixed max_sequence_length padding.
TIMING_PROMPTS = (
    "a red circle on a blue background",
    "a green triangle on a white background",
    "a yellow square on a black background",
    "a blue circle on a red background",
)
TIMING_SEED = 1234
P95 = 0.95

# Called after each unit of work (a reference drawn, a load, a cell, a quality run) with its
# description, the units done and the units in all.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DeviceBenchSpec:
    """What to measure; the CLI's flags, callable from Python and tests."""

    artifacts: tuple[Path, ...]
    resolutions: tuple[int, ...] = (512, 768, 1024)
    batches: tuple[int, ...] = (1, 2, 4)
    steps: int = DEFAULT_STEPS
    runs: int = 5
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    quality: bool = True
    quality_seeds: tuple[int, ...] = (0,)
    adherence_scenes: int | None = None  # shapes model: the first N captions (None: all 90)
    reference: Path | None = None  # instead of the source each manifest names
    profile: str | None = None  # a PROFILES name; None: the detected device

    def work_units(self, references: int) -> int:
        """Units of work with ``references`` distinct references to draw."""
        cells = len(self.resolutions) * len(self.batches)
        return references + len(self.artifacts) * (1 + cells + int(self.quality))


@dataclass
class _Reference:
    path: Path
    samples: list[Any]  # quantize.quality.Sample
    adherence: dict[str, float | int] | None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def software_versions() -> dict[str, str]:
    """Python, the project, torch's CUDA and the libraries that shape the numbers."""
    import torch

    from quantize.build import library_versions
    from zimage_edge import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "zimage-edge": __version__,
        "cuda": str(torch.version.cuda),
        **library_versions(),
    }


def _thread_facts() -> dict[str, Any]:
    import torch

    from zimage_edge.cpu import CpuSettings, decide_threads, read_cpu

    settings = CpuSettings()
    decision = decide_threads(read_cpu(), threads=settings.threads, share=settings.share)
    return {
        "intra_op": torch.get_num_threads(),
        "inter_op": torch.get_num_interop_threads(),
        "policy": decision.reason,
    }


def _manifests(paths: Sequence[Path]) -> list[Manifest]:
    manifests = []
    for path in paths:
        if not is_artifact(path):
            raise UsageError(f"{path} is not an artifact (no manifest.json); make one with `zimage-edge quantize`")
        manifests.append(read_manifest(path)[0])
    return manifests


def reference_dir(manifest: Manifest, override: Path | None) -> Path:
    """The bf16 model ``manifest`` was made from (or ``override``), checked against the recorded digest."""
    from zimage_edge.model.loading import resolve_source

    path = Path(override) if override is not None else resolve_source(manifest.source.id)
    if not path.is_dir():
        raise UsageError(f"reference {path} of {manifest.variant_name} is not a directory")
    digest = tree_digest(hash_tree(path, skip=frozenset()))
    if digest != manifest.source.sha256:
        raise UsageError(
            f"{path} is not the model {manifest.variant_name} was made from (its files differ from the source "
            f"digest in the manifest); pass the original with --reference"
        )
    return path


def _quality_spec(reference: Path, spec: DeviceBenchSpec) -> Any:
    from quantize.quality import QualitySpec
    from zimage_edge.shapes.data import trained_size

    # A shapes model is compared at its own size; others at the smallest benchmarked resolution,
    # the cheapest point that still runs every component.
    side = trained_size(reference) or min(spec.resolutions)
    return QualitySpec(seeds=spec.quality_seeds, width=side, height=side, steps=spec.steps)


def _adherence(pipe: Any, spec: DeviceBenchSpec) -> dict[str, float | int]:
    from zimage_edge.shapes.data import all_scenes
    from zimage_edge.shapes.evaluate import evaluate

    scenes = all_scenes()
    return evaluate(pipe, scenes=scenes[: spec.adherence_scenes] if spec.adherence_scenes else scenes)


def _draw_reference(path: Path, spec: DeviceBenchSpec, facts: DeviceFacts) -> _Reference:
    from quantize.quality import run_samples
    from zimage_edge.model.loading import load_pipeline

    loaded = load_pipeline(path, facts=facts)
    samples = run_samples(loaded.pipe, _quality_spec(path, spec))
    adherence = _adherence(loaded.pipe, spec) if (path / SHAPES_MARKER).is_file() else None
    return _Reference(path, samples, adherence)


def _prediction(root: Path, manifest: Manifest, dtype: str, workload: Workload) -> Prediction:
    model = spec_from_dir(
        root, manifest.model_id, {name: (c.params, c.quantized_params) for name, c in manifest.components.items()}
    )
    variant = VariantRecipe.from_dict(manifest.variant.model_dump(mode="json"))
    est = estimate(model, variant, dtype, workload)
    return Prediction(
        weights_bytes=est.total_weights,
        activation_bytes=max(est.activations["transformer"], est.activations["vae"]),
        peak_bytes=placement_bytes(est, Placement.RESIDENT)[0],
    )


def _cell(
    pipe: Any,
    meter: Any,
    *,
    baseline: int,
    size: int,
    batch: int,
    spec: DeviceBenchSpec,
    predicted: Prediction,
) -> Cell:
    from zimage_edge.model.generate import generate_batch

    requests = [
        GenerationRequest(
            prompt=TIMING_PROMPTS[i % len(TIMING_PROMPTS)], width=size, height=size, steps=spec.steps,
            seed=TIMING_SEED + i, max_sequence_length=spec.max_sequence_length,
        )
        for i in range(batch)
    ]  # fmt: skip
    meter.reset()
    generate_batch(pipe, requests)  # warm-up: kernels, allocator blocks, caches (inside the memory window)
    latencies = []
    for _ in range(spec.runs):
        started = time.perf_counter()
        generate_batch(pipe, requests)
        latencies.append(time.perf_counter() - started)
    peak = meter.peak()
    p50 = statistics.median(latencies)
    measured = peak - baseline
    return Cell(
        width=size,
        height=size,
        batch=batch,
        steps=spec.steps,
        runs=spec.runs,
        latency_p50_s=round(p50, 6),
        latency_p95_s=round(percentile(latencies, P95), 6),
        images_per_s=round(batch / p50, 4),
        peak_bytes=measured,
        peak_abs_bytes=peak,
        predicted=predicted,
        relative_error=round((predicted.peak_bytes - measured) / measured, 4) if measured > 0 else 0.0,
    )


def _quality(pipe: Any, root: Path, reference: _Reference, spec: DeviceBenchSpec) -> QualityResult:
    import numpy as np

    from quantize.quality import compare, run_samples

    qspec = _quality_spec(reference.path, spec)
    comparison = compare(reference.samples, run_samples(pipe, qspec))
    adherence = _adherence(pipe, spec) if (root / SHAPES_MARKER).is_file() and reference.adherence else None
    return QualityResult(
        reference=str(reference.path),
        width=qspec.width,
        height=qspec.height,
        steps=qspec.steps,
        samples=len(comparison.psnr_db),
        psnr_db_mean=round(float(np.mean(comparison.psnr_db)), 3),
        psnr_db_min=round(min(comparison.psnr_db), 3),
        ssim_mean=round(float(np.mean(comparison.ssim)), 5),
        ssim_min=round(min(comparison.ssim), 5),
        latent_rel_l2_max=round(max(comparison.latent_rel_l2), 6),
        adherence=adherence,
        reference_adherence=reference.adherence if adherence else None,
    )


def _profile(spec: DeviceBenchSpec, facts: DeviceFacts) -> DeviceProfile:
    if spec.profile is None:
        return profile_from_facts(facts)
    try:
        return get_profile(spec.profile)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_device_bench(
    spec: DeviceBenchSpec, *, facts: DeviceFacts | None = None, progress: Progress | None = None
) -> DeviceBenchResults:
    """Measure every artifact of ``spec`` on this device (or the one ``facts`` describes)."""
    import diffusers  # noqa: F401  (imported before any load: no cold load pays for the libraries)
    import transformers  # noqa: F401

    from quantize.models import load_model
    from quantize.peak_memory import PeakMeter, release_memory
    from zimage_edge.device import detect_device, dtype_policy, torch_device

    if not spec.artifacts or not spec.resolutions or not spec.batches or spec.runs < 1:
        raise UsageError("give at least one artifact, resolution and batch size, and at least one run")
    facts = facts or detect_device()
    policy = dtype_policy(facts)
    device = torch_device(facts)
    profile = _profile(spec, facts)
    manifests = _manifests(spec.artifacts)
    reference_of = [reference_dir(m, spec.reference) for m in manifests] if spec.quality else []
    total = spec.work_units(len(set(reference_of)))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(what, done, total)

    references: dict[Path, _Reference] = {}
    for path in reference_of:
        if path not in references:
            references[path] = _draw_reference(path, spec, facts)
            release_memory(device)
            tick(f"reference {path.name} drawn")

    meter = PeakMeter(device)
    results = []
    for index, (root, manifest) in enumerate(zip(spec.artifacts, manifests, strict=True)):
        name = manifest.variant_name
        release_memory(device)
        baseline = meter.reset()
        started = time.perf_counter()
        model = load_model(root, facts=facts)
        seconds = time.perf_counter() - started
        load = LoadResult(
            seconds=round(seconds, 4),
            peak_bytes=meter.peak() - baseline,
            loaded_bytes=meter.current() - baseline,
            baseline_bytes=baseline,
        )
        tick(f"{name}: loaded")
        cells = []
        for size in spec.resolutions:
            for batch in spec.batches:
                workload = Workload(size, size, batch, max_sequence_length=spec.max_sequence_length)
                predicted = _prediction(Path(root), manifest, policy.dtype, workload)
                cells.append(
                    _cell(model.pipe, meter, baseline=baseline, size=size, batch=batch, spec=spec, predicted=predicted)
                )
                tick(f"{name}: {size}px x{batch}")
        quality = None
        if spec.quality:
            quality = _quality(model.pipe, Path(root), references[reference_of[index]], spec)
            tick(f"{name}: quality")
        results.append(
            ArtifactResult(
                path=str(root),
                artifact_id=manifest.artifact_id,
                variant=name,
                source=manifest.source.id,
                weight_bytes=sum(f.size for rel, f in manifest.files.items() if rel.endswith(".safetensors")),
                load=load,
                cells=cells,
                quality=quality,
            )
        )
        del model
    release_memory(device)
    return DeviceBenchResults(
        created_at=now_iso(),
        device=facts.to_dict(),
        policy=policy.to_dict(),
        threads=_thread_facts(),
        software=software_versions(),
        memory_meter=meter.method,
        profile=profile.name,
        budget_bytes=budget(profile)[0],
        config=BenchConfig(
            resolutions=list(spec.resolutions),
            batches=list(spec.batches),
            steps=spec.steps,
            runs=spec.runs,
            max_sequence_length=spec.max_sequence_length,
            quality=spec.quality,
            adherence_scenes=spec.adherence_scenes,
        ),
        artifacts=results,
    )
