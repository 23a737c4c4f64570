"""Scoring a shapes model: draw every scene, read each image back, count what was drawn as asked.

Used by training (its summary), the quality gate (adherence of a variant against its reference) and
benchmarks. Drawing needs the model stack; scoring is numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zimage_edge.shapes.data import IMAGE_SIZE, Scene, all_scenes
from zimage_edge.shapes.metric import Adherence

PROMPT_TOKENS = 64  # the templated captions are ~55 byte tokens


def draw_scenes(
    pipe: Any, seeds: tuple[int, ...] = (1000,), scenes: list[Scene] | None = None, batch: int = 32
) -> list[tuple[Scene, np.ndarray]]:
    """Every scene x seed drawn at 64x64, 8 steps, guidance 0 (the Turbo settings), as RGB arrays."""
    from zimage_edge.model.generate import generate_batch
    from zimage_edge.request import GenerationRequest

    scenes = scenes or all_scenes()
    requests = [
        GenerationRequest(
            prompt=s.caption, width=IMAGE_SIZE, height=IMAGE_SIZE, seed=seed, max_sequence_length=PROMPT_TOKENS
        )
        for s in scenes
        for seed in seeds
    ]
    asked = [s for s in scenes for _ in seeds]
    drawn = []
    for start in range(0, len(requests), batch):
        results = generate_batch(pipe, requests[start : start + batch])
        for scene, result in zip(asked[start : start + batch], results, strict=True):
            drawn.append((scene, np.asarray(result.images[0].convert("RGB"))))
    return drawn


def score(drawn: list[tuple[Scene, np.ndarray]]) -> dict[str, float | int]:
    adherence = Adherence()
    for scene, image in drawn:
        adherence.add(scene, image)
    return adherence.to_dict()


def evaluate(pipe: Any, seeds: tuple[int, ...] = (1000,), scenes: list[Scene] | None = None) -> dict[str, float | int]:
    """Prompt adherence over every scene x seed (see ``draw_scenes``)."""
    return score(draw_scenes(pipe, seeds, scenes))
