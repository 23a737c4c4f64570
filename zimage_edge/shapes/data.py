"""Scenes and captions: one shape of one color on a background of another, drawn at 64x64.

Deterministic for a seed. Captions follow one form, ``"a red circle on a blue background"``, which
is the form of prompt the trained model answers.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
# Written beside model_index.json of a trained shapes model: what it was trained on and how well.
MARKER = "zimage_edge_shapes.json"

# sRGB values far apart from each other, so that a pixel's nearest palette color is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
JITTER = 0.06  # largest offset of the shape's centre from the image's, as a fraction of the size


def trained_size(model_dir: str | Path) -> int | None:
    """The image size a shapes model was trained at, or None if ``model_dir`` is not one."""
    try:
        return int(json.loads((Path(model_dir) / MARKER).read_text())["image_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every (shape, color, background) with color != background: 3 x 6 x 5 = 90."""
    return [
        Scene(shape, color, background)
        for shape, color, background in itertools.product(SHAPES, PALETTE, PALETTE)
        if color != background
    ]


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption of the trained form asks for, or None if it is not of that form."""
    words = caption.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    color, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or color not in PALETTE or background not in PALETTE or color == background:
        return None
    return Scene(shape, color, background)


def shape_mask(shape: str, size: float, cx: float, cy: float, n: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of a shape of half-extent ``size`` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= size**2
    if shape == "square":
        return (np.abs(xs - cx) <= size) & (np.abs(ys - cy) <= size)
    if shape == "triangle":  # apex up, base at the bottom
        top, bottom = cy - size, cy + size
        half_width = (ys - top) / (2 * size) * size
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene, rng: np.random.Generator, n: int = IMAGE_SIZE) -> np.ndarray:
    """An HxWx3 uint8 image of ``scene``, near the centre, with a random size and a small random offset.

    Captions do not say where the shape is. Anywhere in the frame, the average of all squares and the
    average of all circles are the same blur, so at high noise (where the shape is decided) the shape
    word barely changes the training target: a model this small, trained that way, draws the right
    colors as blobs (38-49% shape accuracy against 73% here). Near the centre, the shape word shapes
    the target from the first step.
    """
    size = rng.uniform(0.22, 0.34) * n
    cx, cy = n / 2 + rng.uniform(-JITTER, JITTER, size=2) * n
    image = np.empty((n, n, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    image[shape_mask(scene.shape, size, cx, cy, n)] = PALETTE[scene.color]
    return image


def dataset(count_per_scene: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``count_per_scene`` images of every scene: (N, 64, 64, 3) uint8 and the scene of each."""
    rng = np.random.default_rng(seed)
    scenes = [s for s in all_scenes() for _ in range(count_per_scene)]
    images = np.stack([draw(s, rng) for s in scenes])
    return images, scenes
