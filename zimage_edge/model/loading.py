"""Loading a Z-Image pipeline from a local diffusers directory or a Hugging Face id, offline-first.

Order: a local directory; else the local Hugging Face cache; else a clear ``ModelLoadError`` naming what
is missing. Nothing is downloaded unless the caller allows it, and never when ``HF_HUB_OFFLINE`` is
set. A directory is checked before diffusers sees it (layout, configs, safetensors headers), because
diffusers turns some corruptions into warnings and randomly initialised weights.

Loading is blocking work (file I/O, tensor copies): callers on an event loop run it in their executor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import SafetensorError, safe_open

from zimage_edge.device import DeviceFacts, DtypePolicy, detect_device, dtype_policy, torch_device
from zimage_edge.errors import ZimageEdgeError
from zimage_edge.model.layout import MODEL_INDEX, PIPELINE_COMPONENTS, WEIGHT_COMPONENTS

log = logging.getLogger(__name__)

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ZimageEdgeError):
    """A model could not be found or is not a loadable Z-Image pipeline; the message says why."""


@dataclass(frozen=True)
class LoadStats:
    """How long a load took and what it cost in memory."""

    seconds: float
    rss_before: int
    rss_after: int
    gpu_allocated: int = 0
    gpu_peak: int = 0

    @property
    def rss_delta(self) -> int:
        return self.rss_after - self.rss_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "duration_sec": round(self.seconds, 4),
            "rss_before": self.rss_before,
            "rss_after": self.rss_after,
            "rss_delta": self.rss_delta,
            "gpu_allocated": self.gpu_allocated,
            "gpu_peak": self.gpu_peak,
        }


@dataclass
class LoadedPipeline:
    """A ready pipeline plus where it came from and how it runs."""

    pipe: Any  # diffusers.ZImagePipeline (kept as Any: diffusers ships no type information)
    source: str
    path: Path
    facts: DeviceFacts
    policy: DtypePolicy
    stats: LoadStats

    @property
    def device(self) -> str:
        return torch_device(self.facts)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.policy.dtype)


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_source(source: str | Path, *, allow_download: bool = False, cache_dir: Path | None = None) -> Path:
    """Map a directory or a Hugging Face id to a local directory, or raise ``ModelLoadError``.

    ``cache_dir`` is the Hugging Face hub cache (default: the hub's own, from ``HF_HUB_CACHE``/``HF_HOME``).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    looks_like_path = text.startswith((".", "/", "~")) or path.exists() or not _HF_ID.match(text)
    if looks_like_path:
        if path.exists():
            raise ModelLoadError(f"model path {path} is not a directory")
        raise ModelLoadError(f"model directory {path} does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
    except LocalEntryNotFoundError as exc:
        if hf_offline() or not allow_download:
            why = "HF_HUB_OFFLINE is set" if hf_offline() else "downloading was not allowed"
            raise ModelLoadError(
                f"model {text!r} is not a local directory and is not in the local Hugging Face cache, "
                f"and {why}; copy the model to a directory and pass its path, or allow downloading"
            ) from exc
    log.info("downloading %s", text)
    return Path(snapshot_download(text, cache_dir=cache_dir))


def _check_safetensors(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc


def _check_weight_component(component: Path) -> None:
    if not (component / "config.json").is_file():
        raise ModelLoadError(f"{component / 'config.json'} is missing")
    weights = sorted(component.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{component} has no .safetensors weights")
    for shard_index in component.glob("*.safetensors.index.json"):
        shards = set(json.loads(shard_index.read_text()).get("weight_map", {}).values())
        absent = sorted(s for s in shards if not (component / s).is_file())
        if absent:
            raise ModelLoadError(f"{shard_index} names missing shards: {', '.join(absent)}")
    for weight in weights:
        _check_safetensors(weight)


def validate_pipeline_dir(path: Path) -> dict[str, Any]:
    """Check a diffusers Z-Image directory before loading it; returns ``model_index.json``."""
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise ModelLoadError(f"{path} has no {MODEL_INDEX}: not a diffusers pipeline directory")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{index_file} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_file} must hold a JSON object")
    missing = [name for name in PIPELINE_COMPONENTS if name not in index]
    if missing:
        raise ModelLoadError(f"{index_file} lacks components: {', '.join(missing)}")
    for name in PIPELINE_COMPONENTS:
        component = path / name
        if not component.is_dir():
            raise ModelLoadError(f"component directory {component} is missing")
    for name in WEIGHT_COMPONENTS:
        _check_weight_component(path / name)
    return index


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def load_pipeline(
    source: str | Path,
    *,
    facts: DeviceFacts | None = None,
    policy: DtypePolicy | None = None,
    allow_download: bool = False,
    cache_dir: Path | None = None,
) -> LoadedPipeline:
    """Load a diffusers Z-Image pipeline onto the detected (or given) device in the policy dtype."""
    from diffusers import ZImagePipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # A distilled text encoder is a class of this project; diffusers resolves such a class only from
    # modules already imported (it never imports what a model directory names).
    from zimage_edge.model import text_student  # noqa: F401
    from zimage_edge.model.guard import install_fp16_guard

    facts = facts or detect_device()
    policy = policy or dtype_policy(facts)
    path = resolve_source(source, allow_download=allow_download, cache_dir=cache_dir)
    validate_pipeline_dir(path)

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    dtype = getattr(torch, policy.dtype)
    device = torch_device(facts)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss()
    started = time.perf_counter()
    try:
        pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"loading {path} failed: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if policy.fp16_guard:
        install_fp16_guard(pipe.transformer)
        install_fp16_guard(pipe.text_encoder)
    seconds = time.perf_counter() - started
    stats = LoadStats(
        seconds=seconds,
        rss_before=rss_before,
        rss_after=_rss(),
        gpu_allocated=torch.cuda.memory_allocated() if device == "cuda" else 0,
        gpu_peak=torch.cuda.max_memory_allocated() if device == "cuda" else 0,
    )
    log.debug("pipeline_loaded", extra={"event": "pipeline_loaded", "source": str(source), **stats.to_dict()})
    return LoadedPipeline(pipe=pipe, source=str(source), path=path, facts=facts, policy=policy, stats=stats)
