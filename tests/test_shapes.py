"""The shapes task: the adherence metric on hand-made images, the data, and training lowering the loss
(the shipped model's own checks are in test_shapes_model.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_edge.shapes.data import PALETTE, Scene, all_scenes, dataset, draw, parse_caption, shape_mask
from zimage_edge.shapes.metric import Adherence, read_image


def _image(shape: str, color: str, background: str, *, size: float = 16, cx: float = 32, cy: float = 30) -> np.ndarray:
    image = np.empty((64, 64, 3), dtype=np.uint8)
    image[:] = PALETTE[background]
    image[shape_mask(shape, size, cx, cy)] = PALETTE[color]
    return image


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_metric_reads_hand_made_images(shape: str) -> None:
    reading = read_image(_image(shape, "yellow", "blue"))
    assert (reading.shape, reading.color, reading.background) == (shape, "yellow", "blue")


def test_metric_tolerates_noise_and_off_palette_shades() -> None:
    rng = np.random.default_rng(0)
    image = _image("circle", "red", "white", size=12).astype(np.int16) + rng.integers(-35, 36, (64, 64, 3))
    reading = read_image(np.clip(image, 0, 255).astype(np.uint8))
    assert (reading.shape, reading.color, reading.background) == ("circle", "red", "white")


def test_metric_scores_right_and_wrong_images() -> None:
    asked = Scene("square", "green", "black")
    adherence = Adherence()
    adherence.add(asked, _image("square", "green", "black"))  # right
    adherence.add(asked, _image("square", "red", "black"))  # wrong color
    adherence.add(asked, _image("square", "green", "white"))  # wrong background
    adherence.add(asked, _image("circle", "green", "black"))  # wrong shape
    blank = np.full((64, 64, 3), PALETTE["black"], dtype=np.uint8)
    seen = adherence.add(asked, blank)  # nothing drawn
    assert seen.color is None
    assert adherence.to_dict() == {
        "samples": 5, "color_accuracy": 0.4, "shape_accuracy": 0.6, "full_accuracy": 0.2,
    }  # fmt: skip


def test_dataset_is_deterministic_and_complete() -> None:
    images, scenes = dataset(2, seed=3)
    again, _ = dataset(2, seed=3)
    other, _ = dataset(2, seed=4)
    assert np.array_equal(images, again)
    assert not np.array_equal(images, other)
    assert len(scenes) == 2 * len(all_scenes()) == 180
    assert all(read_image(img).color == s.color for img, s in zip(images, scenes, strict=True))


def test_captions_round_trip() -> None:
    for scene in all_scenes():
        assert parse_caption(scene.caption) == scene
    assert parse_caption("a red circle on a red background") is None
    assert parse_caption("a lighthouse at dusk") is None
    assert draw(Scene("triangle", "white", "red"), np.random.default_rng(0)).shape == (64, 64, 3)


def test_a_few_training_steps_lower_the_loss() -> None:
    from zimage_edge.shapes.train import TrainConfig, build_pipeline, encode_latents, train_transformer, train_vae

    config = TrainConfig(vae_steps=40, vae_batch=16, vae_lr=3e-3, transformer_steps=40, transformer_batch=32)
    pipe = build_pipeline(seed=0)
    images, scenes = dataset(2, seed=0)
    vae_losses = train_vae(pipe, images, config)
    assert np.mean(vae_losses[-5:]) < 0.7 * np.mean(vae_losses[:5])
    latents = encode_latents(pipe, images)
    assert abs(float(latents.mean())) < 1e-3
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)
    prompts = sorted({s.caption for s in scenes})
    ids = torch.tensor([prompts.index(s.caption) for s in scenes])
    losses = train_transformer(pipe, latents, ids, prompts, config)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_prompt_encoding_keeps_the_captions() -> None:
    # ZImagePipeline.encode_prompt writes the chat-templated prompts back into the list it gets; the
    # training loop reuses one list, so without a copy every step templated the prompts again until
    # the truncated tokens no longer held the caption (the model then ignored its prompts).
    from zimage_edge.shapes.train import build_pipeline, prompt_embeddings

    pipe = build_pipeline(seed=0)
    prompts = [s.caption for s in all_scenes()[:3]]
    before = list(prompts)
    with torch.no_grad():
        first = prompt_embeddings(pipe, prompts)
        second = prompt_embeddings(pipe, prompts)
    assert prompts == before
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])  # "red circle on green" vs "... on blue"


def test_training_refuses_unknown_held_out_captions(tmp_path: Path) -> None:
    from zimage_edge.shapes.train import TrainConfig, held_out_captions, train_shapes

    assert len(held_out_captions()) == 10
    with pytest.raises(ValueError, match="a purple cube"):
        train_shapes(tmp_path / "out", TrainConfig(held_out=("a purple cube",)))
    assert list(tmp_path.iterdir()) == []
