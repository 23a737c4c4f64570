from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CPU_FACTS
from zimage_edge.model.generate import generate
from zimage_edge.model.loading import load_pipeline
from zimage_edge.model.toy import TOY_SIZES, build_toy_pipeline, save_toy_model
from zimage_edge.request import GenerationRequest

REQUEST = GenerationRequest(prompt="a red circle on a blue background", width=128, height=128, seed=7)


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_layout_is_standard_diffusers(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    for component in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (tiny_model_dir / component).is_dir()
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"][1] == "Qwen3Model"
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16
    assert vae["scaling_factor"] == pytest.approx(0.3611)
    scheduler = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0
    assert scheduler["use_dynamic_shifting"] is False


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = build_toy_pipeline("tiny", seed=1).transformer.state_dict()
    b = build_toy_pipeline("tiny", seed=1).transformer.state_dict()
    c = build_toy_pipeline("tiny", seed=2).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_toy_pipeline("tiny", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_save_reload_gives_the_same_image(tiny_model_dir: Path, tiny_loaded) -> None:
    in_memory = build_toy_pipeline("tiny", seed=0)
    in_memory.set_progress_bar_config(disable=True)
    before = generate(in_memory, REQUEST).images[0]
    after = generate(tiny_loaded.pipe, REQUEST).images[0]
    assert before.size == (128, 128)
    # fp32 on CPU, same weights and seed: equal to within one 8-bit level.
    assert np.abs(pixels(before) - pixels(after)).max() <= 1


def test_seeds_are_deterministic_and_distinct(tiny_loaded) -> None:
    first = generate(tiny_loaded.pipe, REQUEST)
    again = generate(tiny_loaded.pipe, REQUEST)
    other = generate(tiny_loaded.pipe, REQUEST.model_copy(update={"seed": 8}))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other.images[0])).mean() > 5


def test_save_refuses_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    with pytest.raises(FileExistsError):
        save_toy_model(target)


def test_interrupted_save_leaves_nothing_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import ZImagePipeline

    real_save = ZImagePipeline.save_pretrained

    def save_then_fail(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        raise KeyboardInterrupt  # the user pressed ^C after the weights were written

    monkeypatch.setattr(ZImagePipeline, "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_toy_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_medium_model_builds_and_draws(tmp_path: Path) -> None:
    out = save_toy_model(tmp_path / "medium", size="medium", seed=0)
    loaded = load_pipeline(out, facts=CPU_FACTS)
    params = sum(p.numel() for p in loaded.pipe.transformer.parameters())
    assert 55e6 < params < 65e6
    assert TOY_SIZES["medium"].dim == 384
    result = generate(loaded.pipe, REQUEST)
    assert result.images[0].size == (128, 128)
