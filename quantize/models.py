"""Opening any model a node may serve: a verified artifact or a plain diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from quantize.identity import LoadedModel, identify
from quantize.manifest import ArtifactError, is_artifact, is_partial, read_manifest
from zimage_edge.device import DeviceFacts
from zimage_edge.model.layout import WEIGHT_COMPONENTS


def check_model_source(source: str | Path, trusted: list[Ed25519PublicKey] | None = None) -> None:
    """What can be said of a source without reading its weights: refuses partial artifacts, and plain
    directories when only signed artifacts may load (cheap: a few ``stat`` calls)."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and is_artifact(path):
        return
    if path.is_dir() and is_partial(path):
        raise ArtifactError(
            f"{path} is an incomplete artifact (an interrupted build, or quantized weights without a manifest)"
        )
    if trusted:
        raise ArtifactError(f"{source} is not a signed artifact, and trusted keys are configured")


def load_model(
    source: str | Path,
    *,
    facts: DeviceFacts | None = None,
    trusted: list[Ed25519PublicKey] | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load an artifact or a plain diffusers pipeline; with trusted keys only signed artifacts load."""
    from quantize.load import load_artifact
    from zimage_edge.model.loading import load_pipeline

    check_model_source(source, trusted)
    path = Path(str(source)).expanduser()
    if path.is_dir() and is_artifact(path):
        return load_artifact(path, facts=facts, trusted=trusted)
    loaded = load_pipeline(source, facts=facts, allow_download=allow_download)
    return LoadedModel(loaded, identify(loaded))


def inspect_source(source: str | Path, trusted: list[Ed25519PublicKey] | None = None) -> int:
    """Check that ``source`` looks loadable without loading it, and return the bytes of its weights.

    Cheap whatever the directory holds: an artifact's manifest is read (not its files hashed), a
    plain directory's layout and safetensors headers are checked, and only the weight components'
    own files are counted — a wrong path (``/``, a home directory) is refused, never walked.
    """
    from zimage_edge.model.loading import resolve_source, validate_pipeline_dir

    check_model_source(source, trusted)
    path = Path(str(source)).expanduser()
    if path.is_dir() and is_artifact(path):
        manifest, _raw = read_manifest(path)
        return manifest.weight_bytes
    path = resolve_source(source)
    validate_pipeline_dir(path)
    return sum(f.stat().st_size for name in WEIGHT_COMPONENTS for f in (path / name).glob("*.safetensors"))
