"""Loss curves and checkpoints shared by both distillations."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Called with (stage, step, steps, loss) after every training step.
Report = Callable[[str, int, int, float], None]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a run killed mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def write_loss_curve(out: Path, name: str, curves: dict[str, list[float]], every: int = 10) -> None:
    """``name.json`` (every step) and ``name.png`` (a running mean over ``every`` steps, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(curves) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in curves.items():
        if not values:
            continue
        smooth = [sum(values[max(0, i - every + 1) : i + 1]) / len(values[max(0, i - every + 1) : i + 1])
                  for i in range(len(values))]  # fmt: skip
        ax.plot(range(1, len(values) + 1), smooth, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)


def warmup(steps: int) -> float:
    """OneCycle's warm-up fraction: 5 % of the run, but at least two steps (it divides by the length)."""
    return min(0.5, max(0.05, 2.5 / max(steps, 1)))
