"""Prompt adherence, decided from the pixels.

Every pixel is assigned its nearest palette color. The background is the majority color of the
image border; the shape's color is the majority among the other pixels; the shape is told by how
much of its bounding box it fills (square ~1.0, circle ~pi/4, triangle ~0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from zimage_edge.shapes.data import PALETTE, Scene

_NAMES = list(PALETTE)
_COLORS = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)
# Fill ratio of each shape's bounding box.
_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
# A shape must cover at least this many pixels to be read at all (the smallest drawn covers ~300).
MIN_SHAPE_PIXELS = 40
BORDER = 2


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None


def read_image(image: np.ndarray) -> Reading:
    """What a 64x64 RGB image shows."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    distances = ((pixels[..., None, :] - _COLORS) ** 2).sum(axis=-1)
    labels = distances.argmin(axis=-1)
    border = np.concatenate(
        [labels[:BORDER].ravel(), labels[-BORDER:].ravel(), labels[:, :BORDER].ravel(), labels[:, -BORDER:].ravel()]
    )
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    foreground = labels != background
    if foreground.sum() < MIN_SHAPE_PIXELS:
        return Reading(_NAMES[background], None, None)
    color = int(np.bincount(labels[foreground], minlength=len(_NAMES)).argmax())
    mask = labels == color
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = min(_FILL, key=lambda name: abs(_FILL[name] - fill))
    return Reading(_NAMES[background], _NAMES[color], shape)


@dataclass
class Adherence:
    total: int = 0
    colors_right: int = 0  # shape color and background both right
    shapes_right: int = 0
    all_right: int = 0

    def add(self, asked: Scene, image: np.ndarray) -> Reading:
        seen = read_image(image)
        self.total += 1
        colors = seen.background == asked.background and seen.color == asked.color
        self.colors_right += colors
        self.shapes_right += seen.shape == asked.shape
        self.all_right += colors and seen.shape == asked.shape
        return seen

    def to_dict(self) -> dict[str, float | int]:
        n = max(self.total, 1)
        return {
            "samples": self.total,
            "color_accuracy": round(self.colors_right / n, 4),
            "shape_accuracy": round(self.shapes_right / n, 4),
            "full_accuracy": round(self.all_right / n, 4),
        }
