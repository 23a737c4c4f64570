from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_FACTS
from zimage_edge.model.loading import ModelLoadError, load_pipeline, resolve_source, validate_pipeline_dir


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def test_load_reports_time_memory_and_policy(tiny_loaded) -> None:
    assert tiny_loaded.stats.seconds > 0
    assert tiny_loaded.stats.rss_after > 0
    assert tiny_loaded.policy.dtype == "float32"
    assert tiny_loaded.pipe.transformer.dtype == torch.float32
    assert tiny_loaded.device == "cpu"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nope", facts=CPU_FACTS)


def test_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_source(tmp_path / "f")


def test_directory_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_pipeline(tmp_path, facts=CPU_FACTS)


def test_corrupt_model_index(model_copy: Path) -> None:
    (model_copy / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"model_index\.json is not valid JSON"):
        validate_pipeline_dir(model_copy)


def test_missing_component(model_copy: Path) -> None:
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_pipeline(model_copy, facts=CPU_FACTS)


def test_component_missing_from_index(model_copy: Path) -> None:
    index = json.loads((model_copy / "model_index.json").read_text())
    del index["text_encoder"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks components: text_encoder"):
        validate_pipeline_dir(model_copy)


def test_truncated_weights_name_the_file(model_copy: Path) -> None:
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"transformer/diffusion_pytorch_model\.safetensors"):
        load_pipeline(model_copy, facts=CPU_FACTS)


def test_garbage_weights(model_copy: Path) -> None:
    (model_copy / "text_encoder" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"text_encoder/model\.safetensors"):
        validate_pipeline_dir(model_copy)


def test_hf_id_offline_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        resolve_source("Tongyi-MAI/Z-Image-Turbo", allow_download=True, cache_dir=tmp_path / "hub")


def test_hf_id_not_cached_and_download_not_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match="downloading was not allowed"):
        resolve_source("Tongyi-MAI/Z-Image-Turbo", cache_dir=tmp_path / "hub")


def test_hf_id_found_in_local_cache(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REVISION/...}.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Tongyi-MAI--Z-Image-Turbo"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pipeline("Tongyi-MAI/Z-Image-Turbo", facts=CPU_FACTS, cache_dir=tmp_path / "hub")
    assert loaded.path == repo / "snapshots" / revision
    assert loaded.pipe.transformer.config.dim == 64
