"""What a loaded model is: one identity, used by the agent's APIs, metrics and cache, and by the fleet.

Torch-free. An artifact is identified by its ``artifact_id`` (sha256 of its manifest, which lists
every file's sha256): the fleet compares what a node reports with what a release holds by that one
value. A plain diffusers directory has no manifest; it is identified by its resolved path only.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantize.manifest import Manifest
from zimage_edge.request import GenerationRequest
from zimage_edge.shapes.data import trained_size

if TYPE_CHECKING:
    from zimage_edge.model.loading import LoadedPipeline

# What a plain diffusers directory reports as its variant: no recipe, the checkpoint as it is.
PLAIN_VARIANT = "diffusers"
# A1111 clients show the first ten hex digits of a checkpoint's sha256 as its short hash.
SHORT_HASH = 10


@dataclass(frozen=True)
class ModelIdentity:
    """The loaded model, as every API and the fleet see it."""

    id: str  # 64 hex digits: the artifact_id, or for a plain directory sha256 of its resolved path
    source: str  # what was asked to load (a path or a Hugging Face id)
    variant: str
    dtype: str
    device: str
    default_size: int  # the side the model draws at when a request names no size
    manifest: Manifest | None = None  # None for a plain diffusers directory
    loaded_at: float = field(default_factory=time.time)  # Unix time the load finished

    @property
    def is_artifact(self) -> bool:
        return self.manifest is not None

    @property
    def short_hash(self) -> str:
        return self.id[:SHORT_HASH]

    def summary(self) -> dict[str, Any]:
        """JSON for APIs and logs: the identity and, for an artifact, its quality and components."""
        manifest = self.manifest
        return {
            "artifact_id": self.id,
            "source": self.source,
            "variant": self.variant,
            "dtype": self.dtype,
            "device": self.device,
            "default_size": self.default_size,
            "source_sha256": manifest.source.sha256 if manifest else None,
            "quality": manifest.quality.model_dump(mode="json") if manifest else None,
            "components": {k: v.model_dump(mode="json") for k, v in manifest.components.items()} if manifest else None,
            "loaded_at": int(self.loaded_at),
        }


@dataclass
class LoadedModel:
    """A ready pipeline and its identity: what the agent's runner holds."""

    pipeline: LoadedPipeline
    identity: ModelIdentity

    @property
    def pipe(self) -> Any:
        return self.pipeline.pipe


def default_size(path: Path) -> int:
    """The side a model draws at by default: a shapes model's training size, else the request default."""
    native = trained_size(path)
    return native if native is not None else int(GenerationRequest.model_fields["width"].default)


def identify(loaded: LoadedPipeline, manifest: Manifest | None = None) -> ModelIdentity:
    if manifest is not None:
        model_id, variant = manifest.artifact_id, manifest.variant_name
    else:
        model_id = hashlib.sha256(f"dir:{Path(loaded.path).resolve()}".encode()).hexdigest()
        variant = PLAIN_VARIANT
    return ModelIdentity(
        id=model_id,
        source=loaded.source,
        variant=variant,
        dtype=loaded.policy.dtype,
        device=loaded.device,
        default_size=default_size(loaded.path),
        manifest=manifest,
    )
