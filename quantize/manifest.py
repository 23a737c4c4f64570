"""The artifact contract: its layout, its manifest, its identity, and how it is verified.

Torch-free: the fleet controller, the node and ``zimage-edge verify`` check and identify artifacts with
this module alone. An artifact is a directory::

    manifest.json  manifest.sig (optional)  model_index.json
    transformer/   config.json  model-00001.safetensors ...  model.safetensors.index.json  quantization_map.json
    text_encoder/  (same)
    vae/           (same; never quantized)
    tokenizer/  scheduler/

``manifest.json`` is written canonically (sorted keys, two-space indent, trailing newline); the
signature in ``manifest.sig`` covers exactly those bytes, and their sha256 is the artifact's one
identity (``artifact_id``). An artifact is assembled in a hidden sibling directory
(``.NAME.partial-*``) that has no manifest until it is complete, so nothing loads a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from quantize.signing import SignatureError, verify_signature
from zimage_edge.errors import ZimageEdgeError
from zimage_edge.model.layout import FILE_COMPONENTS, MODEL_INDEX, WEIGHT_COMPONENTS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
# Beside each weight component's shards: which tensor is in which shard, and quanto's quantization map
# (diffusers cannot load a quantized component; ``quantize.load`` can).
WEIGHTS_INDEX = "model.safetensors.index.json"
QUANT_MAP = "quantization_map.json"
# Hidden build directories are named ``.NAME.partial-XXXX``.
PARTIAL_MARK = ".partial-"
# Read files in 4 MiB chunks: large enough for full disk throughput, small enough to stay out of RSS.
HASH_CHUNK = 4 * 1024 * 1024

__all__ = [
    "FILE_COMPONENTS", "MODEL_INDEX", "WEIGHT_COMPONENTS", "ArtifactError", "Manifest", "artifact_id",
    "is_artifact", "read_manifest", "verify_artifact",
]  # fmt: skip


class ArtifactError(ZimageEdgeError):
    """An artifact is missing, incomplete, altered or untrusted; nothing was loaded."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the file")
    size: int = Field(ge=0, description="bytes")


class SourceInfo(_Model):
    id: str = Field(description="what was quantized: a Hugging Face id or a directory name")
    revision: str | None = Field(default=None, description="Hugging Face commit of the source, when known")
    sha256: str = Field(description="sha256 over the source's file list and file hashes")


class ComponentInfo(_Model):
    params: int = Field(description="parameters of the component")
    quantized_params: int = Field(description="parameters stored in the quantized type")
    qtype: str | None = Field(description="quanto qtype of the quantized weights, or null")
    bytes: int = Field(description="bytes of the component's weight files")
    bf16_bytes: int = Field(description="bytes the component would take stored entirely in bf16")


class QualityReport(_Model):
    status: Literal["passed", "failed_forced", "not_measured_forced"]
    reason: str = Field(description="why the status is what it is")
    reference_dtype: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    prompts: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    psnr_db_mean: float | None = None
    psnr_db_min: float | None = None
    ssim_mean: float | None = None
    ssim_min: float | None = None
    latent_rel_l2_max: float | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict, description="further metrics (e.g. prompt adherence)")


class ComponentRecord(_Model):
    qtype: str | None = Field(description="quanto qtype of the component's linear weights, or null (16-bit)")
    exclude: list[str] = Field(description="fnmatch patterns of modules left unquantized")


class VariantRecord(_Model):
    """The variant recipe an artifact was made with (``quantize.variants.VariantRecipe.to_dict``)."""

    name: str
    description: str
    storage_dtype: str
    components: dict[str, ComponentRecord]
    int4_group_size: int
    thresholds: dict[str, float]


class WorkloadRecord(_Model):
    width: int
    height: int
    batch: int


class PlannerRecord(_Model):
    """The planner's prediction for a reference workload, recorded when the artifact was made."""

    workload: WorkloadRecord
    dtype: str
    weights_bytes: dict[str, int] = Field(description="predicted weight bytes per component")
    activation_bytes: dict[str, int] = Field(description="predicted activation peak per component")
    peak_device_bytes: dict[str, int] = Field(description="predicted device peak per placement")


class ToolInfo(_Model):
    name: str = "zimage-edge"
    version: str
    libraries: dict[str, str]


class DistillationRecord(_Model):
    """What a distilled student was made from and how (the student's ``zimage_edge_student.json``)."""

    teacher_id: str = Field(description="the teacher the student replaces: a Hugging Face id or a directory name")
    teacher_sha256: str = Field(description="sha256 over the teacher's file list and file hashes")
    components: dict[str, dict[str, Any]] = Field(description="distilled component -> recipe, layers kept, sizes")
    quality: dict[str, Any] = Field(description="measured against the teacher: PSNR/SSIM, prompt adherence")


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    model_id: str
    source: SourceInfo
    variant: VariantRecord = Field(description="the variant recipe the artifact was made with")
    components: dict[str, ComponentInfo]
    files: dict[str, FileEntry] = Field(description="every file of the artifact but the manifest and signature")
    planner: PlannerRecord = Field(description="predicted peak memory by placement for a reference workload")
    quality: QualityReport
    tool: ToolInfo
    created_at: str
    distillation: DistillationRecord | None = Field(
        default=None, description="set when the quantized checkpoint is a distilled student of another model"
    )

    @property
    def variant_name(self) -> str:
        return self.variant.name

    @property
    def weight_bytes(self) -> int:
        """Bytes of every file of the artifact (what a node must download and store)."""
        return sum(entry.size for entry in self.files.values())

    def canonical_bytes(self) -> bytes:
        # A manifest of a model that is not a student has no ``distillation`` key at all, so its bytes
        # (and its artifact_id) are what they were before students existed.
        skip = {"distillation"} if self.distillation is None else None
        return (json.dumps(self.model_dump(mode="json", exclude=skip), sort_keys=True, indent=2) + "\n").encode()

    @property
    def artifact_id(self) -> str:
        """The artifact's identity: sha256 of its canonical ``manifest.json`` (see ``artifact_id``)."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def artifact_id(manifest: Manifest) -> str:
    """The one identity of an artifact: sha256 of ``manifest.json``, which lists every file's sha256.

    Equal to ``sha256sum manifest.json`` of the directory (the file is written canonically), so an
    agent, a node and the fleet controller all compare the same 64 hex digits.
    """
    return manifest.artifact_id


def is_artifact(path: Path) -> bool:
    """A complete artifact directory (a partial build has no manifest yet)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def is_partial(path: Path) -> bool:
    """A build directory left by an interrupted build, or one that holds quantized weights but no manifest."""
    path = Path(path)
    return PARTIAL_MARK in path.name or (
        not is_artifact(path) and any((path / name / QUANT_MAP).is_file() for name in WEIGHT_COMPONENTS)
    )


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# The only files of an artifact that the manifest does not list: the manifest and its signature, at the top.
UNLISTED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})


def tree_files(root: Path, skip: frozenset[str] = UNLISTED) -> list[str]:
    """Relative POSIX paths of the files under ``root``, except the top-level ``skip`` names.

    Refuses what could smuggle data in from elsewhere: a symbolic link that resolves outside ``root``,
    and anything that is neither a regular file nor a directory.
    """
    root_real = root.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root_real):
                    raise ArtifactError(f"{path} is a symbolic link that leaves the artifact (to {target})")
                if target.is_dir():
                    raise ArtifactError(f"{path} is a symbolic link to a directory; artifacts hold plain files")
            elif not (path.is_file() or path.is_dir()):
                raise ArtifactError(f"{path} is not a regular file")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in skip:
                found.append(rel)
    return sorted(found)


def hash_tree(root: Path, skip: frozenset[str] = UNLISTED) -> dict[str, FileEntry]:
    """sha256 and size of every file under ``root`` (relative POSIX paths), except the top-level ``skip``."""
    return {
        rel: FileEntry(sha256=sha256_file(root / rel), size=(root / rel).stat().st_size)
        for rel in tree_files(root, skip)
    }


def tree_digest(entries: dict[str, FileEntry]) -> str:
    """One sha256 over a file list: each line ``path sha256 size``, sorted."""
    lines = "".join(f"{rel} {e.sha256} {e.size}\n" for rel, e in sorted(entries.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_manifest(root: Path) -> tuple[Manifest, bytes]:
    """Parse ``root/manifest.json``; returns the model and the exact bytes (what a signature covers)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not a zimage-edge artifact (or an incomplete one)")
    raw = path.read_bytes()
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not a valid manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.format_version} is not {FORMAT_VERSION}")
    return manifest, raw


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing a path that resolves outside ``root`` (``..``, absolute paths, links)."""
    path = root / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{root}: path {rel!r} leaves the artifact directory")
    return path


def check_weight_indexes(root: Path, manifest: Manifest) -> None:
    """Every shard a weights index names is a listed file of its own component directory."""
    for name in WEIGHT_COMPONENTS:
        rel_index = f"{name}/{WEIGHTS_INDEX}"
        if rel_index not in manifest.files:
            raise ArtifactError(f"{root / rel_index} is missing (a weight component without its index)")
        try:
            weight_map = json.loads((root / rel_index).read_text())["weight_map"]
            shards = {str(shard) for shard in weight_map.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{root / rel_index} is not a valid weights index: {exc}") from exc
        for shard in sorted(shards):
            rel = f"{name}/{shard}"
            _inside(root / name, shard)
            if "/" in shard or rel not in manifest.files:
                raise ArtifactError(f"{root / rel_index} names shard {shard!r}, which is not a file of the artifact")


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file present with its size and hash, and no file that is not listed."""
    listed = set(manifest.files)
    for rel in sorted(listed):
        _inside(root, rel)
    present = set(tree_files(root))
    for rel in sorted(listed - present):
        raise ArtifactError(f"{root / rel} is missing (listed in the manifest)")
    for rel in sorted(present - listed):
        raise ArtifactError(f"{root / rel} is not listed in the manifest")
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{path} has {size} bytes, the manifest says {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path} does not match its sha256 in the manifest (altered or corrupt)")


def verify_artifact(root: Path, trusted: list[Ed25519PublicKey] | None = None) -> tuple[Manifest, str | None]:
    """Check an artifact before anything loads it; returns its manifest and the signing key's id.

    The signature when keys are trusted, then the layout (weights indexes point at listed shards
    inside their component), then every file: present, of its size and sha256, none unlisted, no
    path or link leaving the directory.
    """
    root = Path(root)
    manifest, raw = read_manifest(root)
    key = None
    if trusted:
        signature = root / SIGNATURE_NAME
        if not signature.is_file():
            raise ArtifactError(f"{root} is not signed ({SIGNATURE_NAME} missing) and a trusted key is configured")
        try:
            key = verify_signature(signature.read_bytes(), raw, trusted, where=str(signature))
        except SignatureError as exc:
            raise ArtifactError(str(exc)) from exc
    for name in (MODEL_INDEX, *(f"{c}/config.json" for c in WEIGHT_COMPONENTS)):
        if name not in manifest.files:
            raise ArtifactError(f"{root / name} is missing (not listed in the manifest)")
    check_weight_indexes(root, manifest)
    verify_files(root, manifest)
    return manifest, key
