"""Loss curves and checkpoints shared by both distillations."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
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


@dataclass
class Run:
    """What a resumable training run checkpoints besides its recipe and loss curves."""

    student: Any
    optimizer: Any
    schedule: Any
    generator: torch.Generator

    def state(self, recipe: Any, step: int, losses: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
        """What a checkpoint holds: enough to continue the run exactly where it stopped."""
        return {
            "recipe": asdict(recipe), "step": step, "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(), "losses": losses, **extra,
        }  # fmt: skip

    def restore(self, checkpoint: dict[str, Any]) -> tuple[dict[str, list[float]], int]:
        """Load ``state`` back into the run's objects; returns its loss curves and the step it reached."""
        self.student.load_state_dict(checkpoint["student"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.generator.set_state(checkpoint["generator"])
        return checkpoint["losses"], int(checkpoint["step"])


def check_recipe(checkpoint: dict[str, Any], recipe: Any, work_dir: Path) -> None:
    if checkpoint["recipe"] != asdict(recipe):
        raise ValueError(f"{work_dir} holds a checkpoint of another recipe; use a fresh work directory")


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
