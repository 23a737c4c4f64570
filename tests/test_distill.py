"""Distillation: layer selection, students built from the teacher, training, checkpoints, saving, the
text-encoder student, and the quantize chain, on the tiny random model of the real architecture."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from quantize.distill.build import save_student, with_component
from quantize.distill.layers import build_student, output_error, select_layers
from quantize.distill.recipe import STUDENT_MARKER, StudentInfo, TextEncoderRecipe, TransformerRecipe
from quantize.distill.text_encoder import build_text_student, masked_feature_loss, tokenize
from quantize.distill.trajectories import Trajectories, sample_trajectories, velocity
from quantize.distill.transformer import distill_transformer
from tests.conftest import CPU_FACTS
from zimage_edge.model.loading import load_pipeline
from zimage_edge.model.text_student import CaptionProjectedQwen3Model, caption_features

PROMPTS = ("a red circle on a blue background", "a lighthouse at dusk", "a bowl of ramen", "a green square")


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> Any:
    # A pipeline of its own (tests change modules of it), in fp32 on the CPU.
    return load_pipeline(tiny_model_dir, facts=CPU_FACTS).pipe


@pytest.fixture(scope="module")
def trajectories(teacher: Any) -> Trajectories:
    return sample_trajectories(teacher, PROMPTS, [0, 1], width=64, height=64, num_inference_steps=8,
                               max_sequence_length=64)  # fmt: skip


def recipe(**changes: Any) -> TransformerRecipe:
    base = TransformerRecipe(keep=1, steps=12, batch=8, lr=2e-3, seeds_per_prompt=2, selection_prompts=2,
                             checkpoint_every=4)  # fmt: skip
    return replace(base, **changes)


def test_trajectories_are_the_teachers_states_at_the_turbo_timesteps(teacher: Any, trajectories: Trajectories) -> None:
    # 4 prompts x 2 seeds x 8 steps; timesteps are the pipeline's 1 - sigma, rising from 0 (pure noise).
    assert trajectories.states.shape == (64, 16, 8, 8)
    steps = sorted(set(trajectories.timesteps.tolist()))
    assert len(steps) == 8
    assert steps[0] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= t < 1 for t in steps)
    # The first state of a trajectory is the seed's noise; the next is one Euler step of the teacher.
    first = trajectories.timesteps == 0
    assert torch.equal(
        trajectories.states[first][0], torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(0))
    )


def test_layer_selection_drops_the_layer_that_costs_least(teacher: Any, trajectories: Trajectories) -> None:
    transformer = teacher.transformer
    reference = velocity(transformer, *trajectories.batch(torch.arange(len(trajectories))))
    assert output_error(transformer, trajectories, [0, 1], reference) == pytest.approx(0.0, abs=1e-10)
    selection = select_layers(transformer, trajectories, keep=1)
    errors = selection.single_drop_errors
    cheapest = min(errors, key=lambda layer: errors[layer])
    assert selection.kept == (1 - cheapest,)
    assert selection.removals == ((cheapest, pytest.approx(errors[cheapest])),)
    assert all(e > 0 for e in errors.values())
    assert len(transformer.layers) == 2  # the teacher is whole again after measuring
    with pytest.raises(ValueError, match="keep must be between"):
        select_layers(transformer, trajectories, keep=3)


def test_student_is_the_real_class_with_the_teachers_kept_weights(teacher: Any) -> None:
    from diffusers import ZImageTransformer2DModel

    student = build_student(teacher.transformer, [1])
    assert type(student) is ZImageTransformer2DModel
    assert student.config.n_layers == 1
    assert len(student.layers) == 1
    teacher_state = teacher.transformer.state_dict()
    for key, value in student.state_dict().items():
        source = key.replace("layers.0.", "layers.1.", 1) if key.startswith("layers.") else key
        assert torch.equal(value, teacher_state[source]), key
    assert not any(key.startswith("layers.1.") for key in student.state_dict())


def test_a_few_distillation_steps_lower_the_loss(teacher: Any, tmp_path: Path) -> None:
    result = distill_transformer(teacher, PROMPTS, recipe(steps=30), tmp_path / "work")
    total = result.losses["total"]
    assert len(total) == 30
    assert result.resumed_from == 0
    assert sum(total[-5:]) / 5 < 0.8 * sum(total[:5]) / 5
    assert set(result.losses) == {"total", "velocity", "hidden"}
    assert result.trajectories == len(PROMPTS) * 2 * 8


class Interrupt(Exception):
    pass


def test_a_run_resumes_from_its_checkpoint_to_the_same_student(teacher: Any, tmp_path: Path) -> None:
    straight = distill_transformer(teacher, PROMPTS, recipe(), tmp_path / "straight")

    def stop_after_six(_stage: str, step: int, _steps: int, _loss: float) -> None:
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill_transformer(teacher, PROMPTS, recipe(), tmp_path / "resumed", stop_after_six)
    resumed = distill_transformer(teacher, PROMPTS, recipe(), tmp_path / "resumed")
    assert resumed.resumed_from == 4  # the last checkpoint before the interruption
    assert resumed.losses["total"] == pytest.approx(straight.losses["total"], rel=1e-5)
    for key, value in straight.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another recipe"):
        distill_transformer(teacher, PROMPTS, recipe(lr=1e-3), tmp_path / "resumed")


def test_save_then_load_gives_the_same_output(teacher: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    student = build_student(teacher.transformer, [0])
    pipe = with_component(teacher, "transformer", student)
    info = StudentInfo("tiny", "0" * 64, {"transformer": {"kept": [0]}}, {"psnr_db_mean": 30.0})
    save_student(pipe, tmp_path / "student", info, tiny_model_dir)
    loaded = load_pipeline(tmp_path / "student", facts=CPU_FACTS).pipe
    assert len(loaded.transformer.layers) == 1
    batch = (torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.7]), [torch.randn(5, 32), torch.randn(7, 32)])
    with torch.no_grad():
        torch.testing.assert_close(velocity(loaded.transformer, *batch), velocity(pipe.transformer, *batch))
    record = json.loads((tmp_path / "student" / STUDENT_MARKER).read_text())
    assert record["teacher_id"] == "tiny"
    assert record["components"]["transformer"]["kept"] == [0]


def test_text_encoder_student_feeds_the_pipeline_like_the_teacher(teacher: Any, tmp_path: Path) -> None:
    te_recipe = TextEncoderRecipe(layers=2, hidden=16, heads=2, kv_heads=1)
    student = build_text_student(teacher.text_encoder, te_recipe)
    assert isinstance(student, CaptionProjectedQwen3Model)
    assert student.config.hidden_size == 16
    assert student.config.num_hidden_layers == 2
    ids, mask = tokenize(teacher.tokenizer, list(PROMPTS), 64)
    assert ids.shape == mask.shape == (4, 64)
    with torch.no_grad():
        features = caption_features(student, ids, mask)
        target = caption_features(teacher.text_encoder, ids, mask)
    assert features.shape == target.shape == (4, 64, 32)  # projected to the teacher's caption size
    # Padding is never compared: changing the target there leaves the loss as it is.
    changed = target.clone()
    changed[~mask] = 1e3
    assert masked_feature_loss(features, changed, mask) == masked_feature_loss(features, target, mask)
    # Through the pipeline: the same number of caption tokens per prompt as the teacher's, of its width.
    pipe = with_component(teacher, "text_encoder", student)
    ours, _ = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64)
    theirs, _ = teacher.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64)
    assert [e.shape for e in ours] == [e.shape for e in theirs]


def test_text_encoder_distillation_lowers_the_loss_and_reloads(teacher: Any, tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    from quantize.distill.text_encoder import distill_text_encoder

    te_recipe = TextEncoderRecipe(layers=2, hidden=16, steps=40, batch=4, lr=5e-3, checkpoint_every=20)
    result = distill_text_encoder(teacher, PROMPTS, te_recipe, tmp_path / "work")
    losses = result.losses["features"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    pipe = with_component(teacher, "text_encoder", result.student)
    save_student(pipe, tmp_path / "student", StudentInfo("tiny", "0" * 64), tiny_model_dir)
    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["text_encoder"] == ["zimage_edge.model.text_student", "CaptionProjectedQwen3Model"]
    loaded = load_pipeline(tmp_path / "student", facts=CPU_FACTS).pipe
    assert isinstance(loaded.text_encoder, CaptionProjectedQwen3Model)
    with torch.no_grad():
        ours, _ = loaded.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64)
        before, _ = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=64)
    # Saving casts the pipeline to bf16 and back, rotary frequencies included; the loaded encoder
    # recomputes them in fp32, hence a tolerance above fp32 rounding.
    for a, b in zip(ours, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_distill_command_writes_a_student_that_quantize_takes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from quantize.build import BuildOptions, build_artifact
    from quantize.load import load_artifact
    from quantize.variants import get_variant
    from zimage_edge.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "student"
    argv = ["distill", "transformer", "--teacher", str(tiny_model_dir), "--keep", "1", "--out", str(out),
            "--prompts", str(prompts), "--steps", "4", "--batch", "4", "--seeds-per-prompt", "1", "-q"]  # fmt: skip
    assert main(argv) == 0
    work = tmp_path / "student.distill-work"
    assert (work / "checkpoint.pt").is_file()
    curve = json.loads((work / "transformer-loss.json").read_text())
    assert len(curve["total"]) == 4
    assert (work / "transformer-loss.png").stat().st_size > 0
    record = json.loads((out / STUDENT_MARKER).read_text())
    assert record["teacher_id"] == str(tiny_model_dir)
    assert len(record["components"]["transformer"]["selection"]["kept"]) == 1
    assert {"psnr_db_mean", "ssim_mean"} <= set(record["quality"])
    for config in out.glob("*/config.json"):  # no path of the machine that made it
        assert "_name_or_path" not in json.loads(config.read_text()), config
    assert main(argv) == 2  # the output exists: refused

    manifest = build_artifact(out, get_variant("int8"), tmp_path / "student-int8",
                              BuildOptions(quality=None, force=True, facts=CPU_FACTS))  # fmt: skip
    assert manifest.variant_name == "student-int8"
    assert manifest.distillation is not None
    assert manifest.distillation.teacher_id == str(tiny_model_dir)
    assert manifest.distillation.components["transformer"]["selection"]["kept"] == record["components"][
        "transformer"]["selection"]["kept"]  # fmt: skip
    loaded = load_artifact(tmp_path / "student-int8", facts=CPU_FACTS)
    assert len(loaded.pipe.transformer.layers) == 1


def test_a_text_encoder_student_quantizes_and_reloads(teacher: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from quantize.build import BuildOptions, build_artifact
    from quantize.load import load_artifact
    from quantize.variants import get_variant

    student = build_text_student(teacher.text_encoder, TextEncoderRecipe(layers=2, hidden=16))
    pipe = with_component(teacher, "text_encoder", student)
    save_student(pipe, tmp_path / "student", StudentInfo("tiny", "0" * 64), tiny_model_dir)
    build_artifact(tmp_path / "student", get_variant("int8-te8"), tmp_path / "art",
                   BuildOptions(quality=None, force=True, facts=CPU_FACTS))  # fmt: skip
    loaded = load_artifact(tmp_path / "art", facts=CPU_FACTS)
    assert type(loaded.pipe.text_encoder).__name__ == "CaptionProjectedQwen3Model"
    assert loaded.identity.variant == "student-int8-te8"
    with torch.no_grad():
        ours, _ = loaded.pipe.encode_prompt(prompt=["a red circle"], do_classifier_free_guidance=False,
                                            max_sequence_length=64)  # fmt: skip
        ref, _ = pipe.encode_prompt(prompt=["a red circle"], do_classifier_free_guidance=False, max_sequence_length=64)
    assert ours[0].shape == ref[0].shape
    cosine = torch.nn.functional.cosine_similarity(ours[0].flatten(), ref[0].flatten(), dim=0)
    assert cosine > 0.99  # int8 weights: close to the bf16 student
