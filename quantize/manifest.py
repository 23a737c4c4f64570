"""The artifact manifest: what an artifact is made of, from what, how, and how good it is.

Torch-free: the fleet controller verifies and distributes artifacts with this module alone.
``manifest.json`` is written canonically (sorted keys, two-space indent, trailing newline) and the
signature in ``manifest.sig`` covers exactly those bytes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
# Read files in 4 MiB chunks: large enough for full disk throughput, small enough to stay out of RSS.
HASH_CHUNK = 4 * 1024 * 1024


class ArtifactError(RuntimeError):
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


class ToolInfo(_Model):
    name: str = "zimage-edge"
    version: str
    libraries: dict[str, str]


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    model_id: str
    source: SourceInfo
    variant: dict[str, Any] = Field(description="the variant recipe the artifact was made with")
    components: dict[str, ComponentInfo]
    files: dict[str, FileEntry] = Field(description="every file of the artifact but the manifest and signature")
    planner: dict[str, Any] = Field(description="predicted peak memory by placement for a reference workload")
    quality: QualityReport
    tool: ToolInfo
    created_at: str

    @property
    def variant_name(self) -> str:
        return str(self.variant["name"])

    def canonical_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path, skip: frozenset[str] = frozenset({MANIFEST_NAME, SIGNATURE_NAME})) -> dict[str, FileEntry]:
    """sha256 and size of every regular file under ``root`` (relative POSIX paths), except ``skip``."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


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


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file present with its size and hash, and no file that is not listed."""
    listed = set(manifest.files)
    present = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in {MANIFEST_NAME, SIGNATURE_NAME}
    }
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
