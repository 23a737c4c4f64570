"""Depth-pruned transformer student, distilled on the teacher's own trajectories.

Loss per batch of trajectory states: MSE of the student's velocity against the teacher's, plus
``hidden_weight`` x the MSE of each student main layer's output against the output of the teacher
layer it was copied from (the layers that align). The optimizer, the step and the RNG state are
checkpointed every ``checkpoint_every`` steps; a run started again with the same work directory
continues where the last checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from quantize.distill.layers import Selection, build_student, select_layers
from quantize.distill.progress import (
    CHECKPOINT,
    Report,
    Run,
    check_recipe,
    load_checkpoint,
    save_checkpoint,
    warmup,
)
from quantize.distill.recipe import TransformerRecipe
from quantize.distill.trajectories import Trajectories, sample_trajectories, velocity


class _Capture:
    """Outputs of chosen main layers, recorded by forward hooks."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        self.outputs.append(output)

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class TransformerDistillation:
    """What a run produced: the student, its layer selection and its loss curves."""

    student: Any
    selection: Selection
    losses: dict[str, list[float]]
    trajectories: int
    resumed_from: int

    def summary(self, recipe: TransformerRecipe) -> dict[str, Any]:
        tail = max(1, len(self.losses["total"]) // 20)
        return {
            "recipe": asdict(recipe),
            "teacher_layers": len(self.selection.single_drop_errors),
            "selection": self.selection.to_dict(),
            "trajectory_states": self.trajectories,
            "loss_first": self.losses["total"][0] if self.losses["total"] else None,
            "loss_last": sum(self.losses["total"][-tail:]) / tail if self.losses["total"] else None,
        }


def distillation_loss(
    teacher: Any, student: Any, kept: Sequence[int], batch: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]],
    *, hidden_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(total, velocity term, hidden-state term) for one batch of (states, timesteps, caption features)."""
    states, timesteps, features = batch
    teacher_capture = _Capture([teacher.layers[i] for i in kept])
    student_capture = _Capture(list(student.layers))
    try:
        with torch.no_grad():
            target = velocity(teacher, states, timesteps, features)
        teacher_hidden = teacher_capture.take()
        prediction = velocity(student, states, timesteps, features)
        student_hidden = student_capture.take()
    finally:
        teacher_capture.close()
        student_capture.close()
    v_loss = F.mse_loss(prediction, target)
    h_loss = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden, teacher_hidden,
                                                                           strict=True)]).mean()  # fmt: skip
    return v_loss + hidden_weight * h_loss, v_loss, h_loss


def teacher_trajectories(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], recipe: TransformerRecipe
) -> Trajectories:
    return sample_trajectories(
        pipe, prompts, seeds, width=recipe.width, height=recipe.height,
        num_inference_steps=recipe.num_inference_steps, max_sequence_length=recipe.max_sequence_length,
    )  # fmt: skip


def distill_transformer(
    teacher_pipe: Any, prompts: Sequence[str], recipe: TransformerRecipe, work_dir: Path,
    report: Report | None = None,
) -> TransformerDistillation:  # fmt: skip
    """Select layers, build the student and train it; resumes from ``work_dir`` when it holds a checkpoint."""
    teacher = teacher_pipe.transformer.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    checkpoint = load_checkpoint(Path(work_dir) / CHECKPOINT)
    seeds = [recipe.seed * 100_003 + k for k in range(recipe.seeds_per_prompt)]
    data = teacher_trajectories(teacher_pipe, prompts, seeds, recipe)
    if checkpoint is not None:
        check_recipe(checkpoint, recipe, work_dir)
        selection = Selection(
            tuple(checkpoint["selection"]["kept"]),
            tuple((r["layer"], r["error"]) for r in checkpoint["selection"]["removals"]),
            {int(k): v for k, v in checkpoint["selection"]["single_drop_errors"].items()},
        )
    else:
        # A subset of prompts is enough to rank layers; every seed of those prompts is used.
        subset = list(prompts)[:: max(1, len(prompts) // recipe.selection_prompts)][: recipe.selection_prompts]
        selection = select_layers(teacher, teacher_trajectories(teacher_pipe, subset, seeds[:2], recipe), recipe.keep)
    student = build_student(teacher, selection.kept).float().to(teacher.device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=warmup(recipe.steps))  # fmt: skip
    generator = torch.Generator().manual_seed(recipe.seed + 7)
    run = Run(student, optimizer, schedule, generator)
    losses: dict[str, list[float]] = {"total": [], "velocity": [], "hidden": []}
    start = 0
    if checkpoint is not None:
        losses, start = run.restore(checkpoint)

    # Sampling weights of the trajectory states (see ``TransformerRecipe.early_weight``).
    early = data.timesteps < data.timesteps.unique().sort().values[recipe.num_inference_steps // 2]
    draw = torch.where(early, recipe.early_weight, 1.0)

    def save(step: int) -> None:
        state = run.state(recipe, step, losses, selection=selection.to_dict())
        save_checkpoint(Path(work_dir) / CHECKPOINT, state)

    for step in range(start, recipe.steps):
        if recipe.early_weight == 1.0:
            index = torch.randint(0, len(data), (recipe.batch,), generator=generator)
        else:
            index = torch.multinomial(draw, recipe.batch, replacement=True, generator=generator)
        total, v_loss, h_loss = distillation_loss(teacher, student, selection.kept, data.batch(index, teacher.device),
                                                  hidden_weight=recipe.hidden_weight)  # fmt: skip
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses["total"].append(total.item())
        losses["velocity"].append(v_loss.item())
        losses["hidden"].append(h_loss.item())
        if report:
            report("transformer", step + 1, recipe.steps, losses["total"][-1])
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
            save(step + 1)
    student.eval()
    return TransformerDistillation(student, selection, losses, len(data), start)
