"""Loading an artifact: verify it, then assemble a ``ZImagePipeline`` from its quantized components.

Each weight component is rebuilt on the meta device in the compute dtype and filled with
``requantize`` from its shards and quantization map: no float copy of a quantized model exists.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load_file

from quantize.backend import BACKENDS, DEFAULT_BACKEND
from quantize.components import build_skeleton, component_class, restore_nonpersistent
from quantize.identity import LoadedModel, identify
from quantize.manifest import QUANT_MAP, WEIGHTS_INDEX, ArtifactError, verify_artifact
from zimage_edge.device import DeviceFacts, DtypePolicy, detect_device, dtype_policy, torch_device
from zimage_edge.model.layout import WEIGHT_COMPONENTS
from zimage_edge.model.loading import LoadedPipeline, LoadStats

log = logging.getLogger(__name__)


def load_component(root: Path, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One weight component of an artifact (or a directory laid out like one) on ``device``, checked."""
    directory = root / name
    index_path = directory / WEIGHTS_INDEX
    if not index_path.is_file():
        raise ArtifactError(f"{index_path} is missing")
    index = json.loads(index_path.read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
    # Scales and unquantized tensors take the compute dtype; fp8 and integer payloads stay as stored.
    state = {
        k: (v.to(dtype) if v.dtype in (torch.float32, torch.bfloat16, torch.float16) else v) for k, v in state.items()
    }
    qmap = json.loads((directory / QUANT_MAP).read_text())
    library, class_name = component_class(root, name)
    module = build_skeleton(directory, library, class_name, dtype)
    BACKENDS[DEFAULT_BACKEND].requantize(module, state, qmap, device)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ArtifactError(f"{directory}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    restore_nonpersistent(module, device)
    module.eval()
    return module


def load_components(root: Path, facts: DeviceFacts, policy: DtypePolicy) -> Any:
    """Assemble a ``ZImagePipeline`` from an artifact's directories (no verification: see load_artifact)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    from zimage_edge.model.guard import install_fp16_guard

    dtype = getattr(torch, policy.dtype)
    device = torch.device(torch_device(facts))
    modules = {name: load_component(root, name, dtype, device) for name in WEIGHT_COMPONENTS}
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    if policy.fp16_guard:
        install_fp16_guard(pipe.transformer)
        install_fp16_guard(pipe.text_encoder)
    return pipe


def load_artifact(
    root: Path,
    *,
    facts: DeviceFacts | None = None,
    policy: DtypePolicy | None = None,
    trusted: list[Ed25519PublicKey] | None = None,
) -> LoadedModel:
    """Verify an artifact (hashes, and signature when keys are trusted), then load it ready to generate."""
    import psutil

    root = Path(root)
    facts = facts or detect_device()
    policy = policy or dtype_policy(facts)
    started = time.perf_counter()
    rss_before = psutil.Process().memory_info().rss
    manifest, _key = verify_artifact(root, trusted)
    pipe = load_components(root, facts, policy)
    stats = LoadStats(
        seconds=time.perf_counter() - started, rss_before=rss_before, rss_after=psutil.Process().memory_info().rss
    )
    log.debug("artifact_loaded", extra={"event": "artifact_loaded", "source": str(root), **stats.to_dict()})
    loaded = LoadedPipeline(pipe=pipe, source=str(root), path=root, facts=facts, policy=policy, stats=stats)
    return LoadedModel(loaded, identify(loaded, manifest))
