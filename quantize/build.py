"""Building an artifact: quantize a checkpoint, measure it against its reference, describe it, sign it.

The artifact is assembled in a hidden sibling directory (``.NAME.partial-*``), loaded back for the
quality gate, hashed into the manifest, signed, verified once more and only then renamed into place.
A partial directory has no manifest, so nothing loads it; the next build of the same target removes it.
Running out of disk (or any other write failure) removes the partial directory and says so in one line.
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors import SafetensorError

from quantize import quality as q
from quantize.backend import BACKENDS, DEFAULT_BACKEND, QuantBackend
from quantize.components import build_skeleton, component_class
from quantize.distill.recipe import STUDENT_MARKER, read_student_info
from quantize.load import load_components
from quantize.manifest import (
    MANIFEST_NAME,
    PARTIAL_MARK,
    SIGNATURE_NAME,
    ArtifactError,
    ComponentInfo,
    DistillationRecord,
    Manifest,
    PlannerRecord,
    QualityReport,
    SourceInfo,
    ToolInfo,
    VariantRecord,
    hash_tree,
    is_artifact,
    is_partial,
    now_iso,
    tree_digest,
    verify_artifact,
)
from quantize.planner import PLACEMENT_ORDER, Workload, estimate, placement_bytes
from quantize.signing import sign_bytes
from quantize.specs import ModelSpec, spec_from_dir
from quantize.streaming import DEFAULT_MAX_SHARD_BYTES, ComponentResult, SourceWeights, count_units, quantize_component
from quantize.variants import VariantRecipe, student_variant
from zimage_edge import __version__
from zimage_edge.device import DeviceFacts, detect_device, dtype_policy
from zimage_edge.model.layout import FILE_COMPONENTS, MODEL_INDEX, WEIGHT_COMPONENTS
from zimage_edge.model.loading import load_pipeline, resolve_source, validate_pipeline_dir
from zimage_edge.shapes.data import MARKER as SHAPES_MARKER
from zimage_edge.shapes.evaluate import evaluate as evaluate_shapes

log = logging.getLogger(__name__)

# Called with (component, units done in it, units in it).
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuildOptions:
    quality: q.QualitySpec | None = field(default_factory=q.QualitySpec)  # None: skip the gate (needs force)
    force: bool = False
    sign_key: Ed25519PrivateKey | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    backend: str = DEFAULT_BACKEND
    facts: DeviceFacts | None = None  # where the quality gate runs (default: detected)


def library_versions() -> dict[str, str]:
    """Versions of the libraries an artifact or a measurement depends on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "diffusers", "transformers", "optimum-quanto", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _source_info(source: str, path: Path) -> SourceInfo:
    entries = hash_tree(path, skip=frozenset())
    # Hugging Face cache snapshots live in .../snapshots/<commit>/.
    revision = path.name if path.parent.name == "snapshots" else None
    return SourceInfo(id=source, revision=revision, sha256=tree_digest(entries))


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove partial directories left by interrupted builds of ``out``."""
    removed = []
    for stale in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def _planner_prediction(model: ModelSpec, variant: VariantRecipe, dtype: str) -> PlannerRecord:
    workload = Workload()  # the planner's reference workload: one image at the model's 1024x1024
    est = estimate(model, variant, dtype, workload)
    return PlannerRecord.model_validate({
        "workload": {"width": workload.width, "height": workload.height, "batch": workload.batch},
        "dtype": dtype,
        "weights_bytes": est.weights,
        "activation_bytes": est.activations,
        "peak_device_bytes": {str(p): placement_bytes(est, p)[0] for p in PLACEMENT_ORDER},
    })  # fmt: skip


def build_artifact(
    source: str | Path,
    variant: VariantRecipe,
    out: Path,
    options: BuildOptions | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Quantize ``source`` with ``variant`` into the artifact directory ``out``."""
    options = options or BuildOptions()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output or remove it")
    if options.quality is None and not options.force:
        raise ValueError("skipping the quality gate requires force: the manifest would have no quality")
    backend = BACKENDS[options.backend]
    src = resolve_source(source)
    if is_artifact(src) or is_partial(src):
        raise ArtifactError(f"{src} is an artifact (or a partial one); quantize the original checkpoint instead")
    validate_pipeline_dir(src)
    distillation = _distillation(src)
    if distillation is not None:
        # A student's artifacts carry their own names, so a release can hold ``int4`` of the full model
        # and ``student-int8`` side by side.
        variant = student_variant(variant)
    storage_dtype = getattr(torch, variant.storage_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARK}", dir=out.parent))
    try:
        shutil.copy2(src / MODEL_INDEX, tmp / MODEL_INDEX)
        for marker in (SHAPES_MARKER, STUDENT_MARKER):
            if (src / marker).is_file():
                shutil.copy2(src / marker, tmp / marker)
        for name in FILE_COMPONENTS:
            shutil.copytree(src / name, tmp / name)
        results: dict[str, ComponentResult] = {}
        for name in WEIGHT_COMPONENTS:
            results[name] = _quantize_one(
                src,
                tmp,
                name,
                variant=variant,
                storage_dtype=storage_dtype,
                backend=backend,
                options=options,
                progress=progress,
            )
        spec = _spec_from_results(src, results)
        quality = _quality_gate(src, tmp, variant, options)
        files = hash_tree(tmp)
        manifest = Manifest(
            model_id=str(source),
            source=_source_info(str(source), src),
            variant=VariantRecord.model_validate(variant.to_dict()),
            components={
                name: ComponentInfo(
                    params=r.params,
                    quantized_params=r.quantized_params,
                    qtype=str(variant.component(name).qtype) if variant.component(name).qtype else None,
                    bytes=sum(files[f"{name}/{f}"].size for f in r.files if f.endswith(".safetensors")),
                    bf16_bytes=r.params * 2,
                )
                for name, r in results.items()
            },
            files=files,
            planner=_planner_prediction(spec, variant, "bfloat16"),
            quality=quality,
            tool=ToolInfo(version=__version__, libraries=library_versions()),
            created_at=now_iso(),
            distillation=distillation,
        )
        data = manifest.canonical_bytes()
        (tmp / MANIFEST_NAME).write_bytes(data)
        trusted: list[Ed25519PublicKey] = []
        if options.sign_key is not None:
            (tmp / SIGNATURE_NAME).write_bytes(sign_bytes(data, options.sign_key))
            trusted = [options.sign_key.public_key()]
        verify_artifact(tmp, trusted)
        tmp.rename(out)
    except (OSError, SafetensorError) as exc:  # safetensors reports write failures as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(_write_failure(out, exc)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _distillation(src: Path) -> DistillationRecord | None:
    """The student record of a distilled source, as the manifest keeps it (None for any other model)."""
    info = read_student_info(src)
    return DistillationRecord.model_validate(info.to_dict()) if info is not None else None


def _write_failure(out: Path, exc: OSError | SafetensorError) -> str:
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or f"os error {errno.ENOSPC})" in str(exc):
        return f"no space left on the device while writing {out}; nothing was kept, free some space and retry"
    return f"writing {out} failed: {exc}; nothing was kept"


def _quantize_one(
    src: Path,
    tmp: Path,
    name: str,
    *,
    variant: VariantRecipe,
    storage_dtype: torch.dtype,
    backend: QuantBackend,
    options: BuildOptions,
    progress: Progress | None,
) -> ComponentResult:
    library, class_name = component_class(src, name)
    skeleton = build_skeleton(src / name, library, class_name, storage_dtype)
    (tmp / name).mkdir()
    shutil.copy2(src / name / "config.json", tmp / name / "config.json")
    total = count_units(skeleton)
    done = 0

    def on_unit(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(name, done, total)

    result = quantize_component(
        SourceWeights(src / name),
        skeleton,
        variant.component(name),
        storage_dtype=storage_dtype,
        out_dir=tmp / name,
        backend=backend,
        max_shard_bytes=options.max_shard_bytes,
        on_unit=on_unit,
    )
    if result.ignored_source_keys:
        log.warning("%s: source tensors not used by %s: %s", name, class_name, result.ignored_source_keys[:10])
    return result


def _spec_from_results(src: Path, results: dict[str, ComponentResult]) -> ModelSpec:
    return spec_from_dir(src, str(src), {name: (r.params, r.quantized_params) for name, r in results.items()})


def _quality_gate(src: Path, tmp: Path, variant: VariantRecipe, options: BuildOptions) -> QualityReport:
    if options.quality is None:
        return QualityReport(status="not_measured_forced", reason="quality gate skipped with force")
    facts = options.facts or detect_device()
    policy = dtype_policy(facts)
    # One pipeline in memory at a time: the reference's samples are kept, the pipeline is dropped.
    reference = load_pipeline(src, facts=facts, policy=policy)
    ref_samples = q.run_samples(reference.pipe, options.quality)
    # A shapes model is also scored on prompt adherence, on every caption (one fixed seed).
    shapes = (src / SHAPES_MARKER).is_file()
    ref_adherence = evaluate_shapes(reference.pipe) if shapes else None
    del reference
    candidate = load_components(tmp, facts, policy)
    cand_samples = q.run_samples(candidate, options.quality)
    adherence = {"reference": ref_adherence, "candidate": evaluate_shapes(candidate)} if ref_adherence else None
    del candidate
    comparison = q.compare(ref_samples, cand_samples)
    return q.report(
        comparison, options.quality, variant.thresholds, policy.dtype, forced=options.force, adherence=adherence
    )
