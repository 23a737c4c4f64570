"""Text-encoder student: a smaller ``Qwen3Model`` plus a projection, trained on the teacher's caption features.

Inputs are tokenized exactly as ``ZImagePipeline`` does (chat template, padding to
``max_sequence_length``); the target is the teacher's ``hidden_states[-2]`` at the positions the mask
keeps (what the pipeline hands the transformer). Padding positions are never compared. Text only: no
image is drawn, so this is cheap next to the transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from quantize.distill.progress import (
    CHECKPOINT,
    Report,
    Run,
    check_recipe,
    load_checkpoint,
    save_checkpoint,
    warmup,
)
from quantize.distill.recipe import TextEncoderRecipe
from zimage_edge.model.text_student import CaptionProjectedQwen3Model, caption_features, student_text_config


def tokenize(tokenizer: Any, prompts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, boolean mask) exactly as the pipeline's prompt encoding makes them."""
    templated = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                      enable_thinking=True)
        for p in prompts
    ]  # fmt: skip
    inputs = tokenizer(templated, padding="max_length", max_length=max_sequence_length, truncation=True,
                       return_tensors="pt")  # fmt: skip
    return inputs.input_ids, inputs.attention_mask.bool()


def build_text_student(teacher: Any, recipe: TextEncoderRecipe) -> CaptionProjectedQwen3Model:
    config = student_text_config(
        teacher.config, hidden=recipe.hidden, layers=recipe.layers, intermediate=recipe.intermediate_size,
        heads=recipe.heads, kv_heads=recipe.kv_heads,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return CaptionProjectedQwen3Model(config)


def masked_feature_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the kept positions, relative to the target's mean square (scale-free across models)."""
    diff = (prediction - target)[mask]
    return (diff**2).mean() / (target[mask] ** 2).mean().clamp_min(1e-12)


@dataclass
class TextDistillation:
    student: CaptionProjectedQwen3Model
    losses: dict[str, list[float]]
    resumed_from: int

    def summary(self, recipe: TextEncoderRecipe, teacher_params: int) -> dict[str, Any]:
        params = sum(p.numel() for p in self.student.parameters())
        tail = max(1, len(self.losses["features"]) // 20)
        return {
            "recipe": asdict(recipe),
            "params": params,
            "teacher_params": teacher_params,
            "params_ratio": round(params / teacher_params, 4),
            "loss_first": self.losses["features"][0] if self.losses["features"] else None,
            "loss_last": sum(self.losses["features"][-tail:]) / tail if self.losses["features"] else None,
        }


def distill_text_encoder(
    teacher_pipe: Any, prompts: Sequence[str], recipe: TextEncoderRecipe, work_dir: Path,
    report: Report | None = None,
) -> TextDistillation:  # fmt: skip
    """Train a text-encoder student on ``prompts``; resumes from ``work_dir`` when it holds a checkpoint."""
    teacher = teacher_pipe.text_encoder.eval()
    ids, mask = tokenize(teacher_pipe.tokenizer, prompts, recipe.max_sequence_length)
    ids, mask = ids.to(teacher.device), mask.to(teacher.device)
    student = build_text_student(teacher, recipe).to(teacher.device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=warmup(recipe.steps))  # fmt: skip
    generator = torch.Generator().manual_seed(recipe.seed + 11)
    run = Run(student, optimizer, schedule, generator)
    losses: dict[str, list[float]] = {"features": []}
    start = 0
    checkpoint = load_checkpoint(Path(work_dir) / CHECKPOINT)
    if checkpoint is not None:
        check_recipe(checkpoint, recipe, work_dir)
        losses, start = run.restore(checkpoint)
    for step in range(start, recipe.steps):
        index = torch.randint(0, len(ids), (min(recipe.batch, len(ids)),), generator=generator)
        # The teacher's features are computed per batch: for a real corpus (thousands of prompts of 512
        # tokens x 2560 features) keeping them all would take tens of GB.
        with torch.no_grad():
            target = caption_features(teacher, ids[index], mask[index]).float()
        loss = masked_feature_loss(caption_features(student, ids[index], mask[index]), target, mask[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses["features"].append(loss.item())
        if report:
            report("text_encoder", step + 1, recipe.steps, losses["features"][-1])
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
            state = run.state(recipe, step + 1, losses)
            save_checkpoint(Path(work_dir) / CHECKPOINT, state)
    student.eval()
    return TextDistillation(student, losses, start)
