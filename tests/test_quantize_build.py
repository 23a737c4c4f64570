"""Building artifacts: interruption, the quality gate, streaming equivalence, sharding."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantize.build as build_module
from quantize.backend import BACKENDS, quantize_in_memory
from quantize.build import BuildOptions, build_artifact
from quantize.load import load_artifact
from quantize.manifest import ArtifactError
from quantize.models import load_model
from quantize.quality import QualityGateError, QualitySpec
from quantize.variants import VARIANTS, QualityThresholds
from tests.conftest import CPU_FACTS
from zimage_edge.model.loading import ModelLoadError, load_pipeline

GATE = QualitySpec(prompts=("a red circle",), width=64, height=64)


def _partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def test_interrupted_build_leaves_nothing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # after every weight file was written, before the manifest

    monkeypatch.setattr(build_module, "_quality_gate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_artifact(tiny_model_dir, VARIANTS["int8"], tmp_path / "out", BuildOptions(quality=GATE, facts=CPU_FACTS))
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_no_loadable_artifact(medium_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    command = [
        sys.executable, "-m", "zimage_edge.cli", "quantize", "--source", str(medium_model_dir), "--variant", "int8",
        "--out", str(out), "--quality-size", "64x64", "--max-shard-mb", "4", "-q",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            shards = [s for p in _partials(tmp_path) for s in (p / "transformer").glob("model-*.safetensors")]
            if len(shards) >= 2:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.01)  # wake on the process's exit, or re-check the files
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    (partial,) = _partials(tmp_path)
    assert not (partial / "manifest.json").exists()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_artifact(partial, facts=CPU_FACTS)
    with pytest.raises(ArtifactError, match=r"incomplete artifact"):
        load_model(partial, facts=CPU_FACTS)
    with pytest.raises(ModelLoadError, match=r"holds quantized weights|is missing"):
        load_pipeline(partial, facts=CPU_FACTS)
    # The next build of the same target clears the leftovers and succeeds.
    build_artifact(medium_model_dir, VARIANTS["int8"], out, BuildOptions(quality=GATE, facts=CPU_FACTS))
    assert _partials(tmp_path) == []
    assert load_artifact(out, facts=CPU_FACTS).identity.manifest is not None


def test_quality_gate_refuses_and_explains(tiny_model_dir: Path, tmp_path: Path) -> None:
    strict = replace(VARIANTS["int4"], thresholds=QualityThresholds(min_psnr_db=99, min_ssim=0.5, max_latent_rel_l2=1))
    with pytest.raises(QualityGateError, match=r"PSNR .* dB < 99") as info:
        build_artifact(tiny_model_dir, strict, tmp_path / "a", BuildOptions(quality=GATE, facts=CPU_FACTS))
    assert "--force" in str(info.value)
    assert list(tmp_path.iterdir()) == []

    manifest = build_artifact(
        tiny_model_dir, strict, tmp_path / "a", BuildOptions(quality=GATE, facts=CPU_FACTS, force=True)
    )
    assert manifest.quality.status == "failed_forced"
    assert "PSNR" in manifest.quality.reason
    assert manifest.quality.psnr_db_min is not None
    assert manifest.quality.psnr_db_min < 99


def test_skipping_the_gate_needs_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="requires force"):
        build_artifact(tiny_model_dir, VARIANTS["int8"], tmp_path / "a", BuildOptions(quality=None))
    manifest = build_artifact(
        tiny_model_dir, VARIANTS["int8"], tmp_path / "a", BuildOptions(quality=None, force=True, facts=CPU_FACTS)
    )
    assert manifest.quality.status == "not_measured_forced"


def test_bad_input_changes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        build_artifact(tiny_model_dir, VARIANTS["int8"], tmp_path / "exists")
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_artifact(tmp_path / "nowhere", VARIANTS["int8"], tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_streaming_equals_quantizing_the_whole_model(tiny_model_dir: Path, tmp_path: Path, variant: str) -> None:
    recipe = VARIANTS[variant]
    build_artifact(
        tiny_model_dir, recipe, tmp_path / "a", BuildOptions(quality=None, force=True, max_shard_bytes=64 * 1024)
    )
    directory = tmp_path / "a" / "transformer"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # the small shard limit split the component
    streamed: dict[str, torch.Tensor] = {}
    for shard in shards:
        streamed.update(load_file(str(directory / shard)))

    whole = load_pipeline(tiny_model_dir, facts=CPU_FACTS).pipe.transformer.to(torch.bfloat16)
    quantize_in_memory(whole, recipe.transformer, BACKENDS["optimum-quanto"])
    expected = whole.state_dict()
    assert set(streamed) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(streamed[key], tensor), key
    qmap = json.loads((directory / "quantization_map.json").read_text())
    assert qmap == BACKENDS["optimum-quanto"].quantization_map(whole)


def test_text_encoder_override(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = VARIANTS["int8"].with_text_encoder(VARIANTS["int4-te4"].text_encoder.qtype)
    assert recipe.name == "int8-te4"
    manifest = build_artifact(tiny_model_dir, recipe, tmp_path / "a", BuildOptions(quality=GATE, facts=CPU_FACTS))
    assert manifest.components["text_encoder"].qtype == "qint4"
    assert VARIANTS["int8"].with_text_encoder(VARIANTS["int8-te8"].text_encoder.qtype) is VARIANTS["int8-te8"]
