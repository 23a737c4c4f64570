"""quantize -> save -> load gives the same model as before saving, for every variant."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from quantize.backend import BACKENDS, quantize_in_memory
from quantize.build import BuildOptions, build_artifact
from quantize.load import load_artifact
from quantize.manifest import FORMAT_VERSION, sha256_file
from quantize.quality import QualitySpec
from quantize.variants import VARIANTS
from tests.conftest import CPU_FACTS
from zimage_edge.model.generate import generate
from zimage_edge.model.loading import load_pipeline
from zimage_edge.request import GenerationRequest

REQUEST = GenerationRequest(prompt="a red circle on a blue background", width=64, height=64, seed=3)
GATE = QualitySpec(prompts=("a red circle",), width=64, height=64)


@pytest.mark.parametrize("variant", ["bf16", "int8", "fp8", "int4", "int8-te8", "int4-te4"])
def test_loaded_artifact_matches_the_model_before_saving(tiny_model_dir: Path, tmp_path: Path, variant: str) -> None:
    # fp32 storage isolates save/load from the bf16 cast: before and after must then agree exactly
    # up to float summation order.
    recipe = replace(VARIANTS[variant], storage_dtype="float32")
    build_artifact(tiny_model_dir, recipe, tmp_path / "a", BuildOptions(quality=GATE, facts=CPU_FACTS, force=True))
    loaded = load_artifact(tmp_path / "a", facts=CPU_FACTS)
    after = generate(loaded.pipe, REQUEST)

    before_pipe = load_pipeline(tiny_model_dir, facts=CPU_FACTS).pipe
    backend = BACKENDS["optimum-quanto"]
    quantize_in_memory(before_pipe.transformer, recipe.transformer, backend)
    quantize_in_memory(before_pipe.text_encoder, recipe.text_encoder, backend)
    before = generate(before_pipe, REQUEST)

    torch.testing.assert_close(after.latents, before.latents, atol=1e-5, rtol=1e-5)
    diff = np.abs(np.asarray(after.images[0], np.int16) - np.asarray(before.images[0], np.int16))
    assert diff.max() <= 1


def test_quantized_layers_are_really_quantized(tiny_model_dir: Path, artifacts) -> None:
    from optimum.quanto import QModuleMixin

    loaded = load_artifact(artifacts.get(tiny_model_dir, "int8-te8"), facts=CPU_FACTS)
    transformer, text_encoder = loaded.pipe.transformer, loaded.pipe.text_encoder
    assert isinstance(transformer.layers[0].attention.to_q, QModuleMixin)
    assert isinstance(text_encoder.layers[0].mlp.down_proj, QModuleMixin)
    # Excluded by the recipe: embedders and the final projection stay in the compute dtype.
    assert not isinstance(transformer.all_final_layer["2-1"].linear, QModuleMixin)
    assert not isinstance(transformer.t_embedder.mlp[0], QModuleMixin)
    assert transformer.all_final_layer["2-1"].linear.weight.dtype == torch.float32
    assert not any(p.device.type == "meta" for p in loaded.pipe.transformer.parameters())


def test_text_encoder_rotary_buffers_are_restored(tiny_model_dir: Path, artifacts) -> None:
    loaded = load_artifact(artifacts.get(tiny_model_dir, "int8-te8"), facts=CPU_FACTS)
    reference = load_pipeline(tiny_model_dir, facts=CPU_FACTS).pipe.text_encoder
    torch.testing.assert_close(loaded.pipe.text_encoder.rotary_emb.inv_freq, reference.rotary_emb.inv_freq)
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        got = loaded.pipe.text_encoder(input_ids=ids).last_hidden_state
        want = reference(input_ids=ids).last_hidden_state
    assert torch.isfinite(got).all()
    assert (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item() < 0.05


def test_manifest_describes_the_artifact(tiny_model_dir: Path, artifacts) -> None:
    root = artifacts.get(tiny_model_dir, "int8")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model_id"] == str(tiny_model_dir)
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["variant"]["name"] == "int8"
    assert manifest["variant"]["components"]["transformer"]["qtype"] == "qint8"
    assert "all_final_layer.*" in manifest["variant"]["components"]["transformer"]["exclude"]
    for rel, entry in manifest["files"].items():
        assert sha256_file(root / rel) == entry["sha256"]
        assert (root / rel).stat().st_size == entry["size"]
    assert "transformer/quantization_map.json" in manifest["files"]
    transformer = manifest["components"]["transformer"]
    assert 0 < transformer["quantized_params"] < transformer["params"]
    assert transformer["bytes"] < transformer["bf16_bytes"]
    assert set(manifest["planner"]["peak_device_bytes"]) == {
        "resident",
        "model_offload",
        "te_freed",
        "sequential_offload",
    }
    quality = manifest["quality"]
    assert quality["status"] == "passed"
    assert quality["psnr_db_min"] >= VARIANTS["int8"].thresholds.min_psnr_db
    assert quality["reference_dtype"] == "float32"
    assert manifest["tool"]["libraries"]["optimum-quanto"]
    assert manifest["created_at"].endswith("Z")


def test_unquantized_artifact_loads_without_quantized_modules(tiny_model_dir: Path, artifacts) -> None:
    from optimum.quanto import QModuleMixin

    loaded = load_artifact(artifacts.get(tiny_model_dir, "bf16"), facts=CPU_FACTS)
    assert not any(isinstance(m, QModuleMixin) for m in loaded.pipe.transformer.modules())
    assert loaded.identity.manifest is not None
    assert loaded.identity.manifest.variant.name == "bf16"
    assert loaded.identity.variant == "bf16"
    assert generate(loaded.pipe, REQUEST).images[0].size == (64, 64)


def test_file_size_ratios_on_the_medium_model(medium_model_dir: Path, artifacts) -> None:
    sizes = {}
    for variant in ("bf16", "int8", "fp8", "int4"):
        manifest = json.loads((artifacts.get(medium_model_dir, variant) / "manifest.json").read_text())
        sizes[variant] = manifest["components"]["transformer"]["bytes"]
        if variant != "bf16":
            assert manifest["quality"]["status"] == "passed", manifest["quality"]
    assert sizes["int8"] / sizes["bf16"] <= 0.52
    assert sizes["fp8"] / sizes["bf16"] <= 0.52
    assert sizes["int4"] / sizes["bf16"] <= 0.30
