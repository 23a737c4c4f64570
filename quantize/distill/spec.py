"""Parameter counts of students, for the planner and the fleet (torch-free).

A student is planned like any model: by its ``ModelSpec``. ``student_spec`` derives one from the
teacher's spec, the layers kept and the text encoder's counts, without building anything (a loaded
student is counted by ``quantize.specs.spec_from_pipeline`` like any pipeline).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from quantize.specs import Z_IMAGE_TURBO, ComponentSpec, ModelSpec

# One main layer of the real transformer (dim 3840, FFN 10240, adaLN from 256), counted on the meta
# device: its linears are all quantizable (no exclusion pattern reaches the main layers).
Z_IMAGE_TURBO_MAIN_LAYER = ComponentSpec(180_910_336, 180_879_360, 180_910_336)
Z_IMAGE_TURBO_MAIN_LAYERS = 30
# A text-encoder student of the real model with the Qwen3-0.6B shape (hidden 1024, 28 layers, 16 heads,
# 8 key/value heads, head dim 128, MLP 3072, the same 151936-token vocabulary and tokenizer) plus the
# 1024 -> 2560 projection, counted on the meta device: 0.149 x Qwen3-4B. Its largest unit is the
# token embedding.
QWEN3_SMALL_STUDENT = ComponentSpec(598_673_920, 443_023_360, 155_582_464)
QWEN3_SMALL_STUDENT_HIDDEN = 1024
QWEN3_SMALL_STUDENT_LAYERS = 28


def student_spec(
    teacher: ModelSpec,
    *,
    name: str,
    keep: int | None = None,
    teacher_layers: int = Z_IMAGE_TURBO_MAIN_LAYERS,
    main_layer: ComponentSpec = Z_IMAGE_TURBO_MAIN_LAYER,
    text_encoder: ComponentSpec | None = None,
    text_hidden: int | None = None,
    text_layers: int | None = None,
) -> ModelSpec:
    """The teacher's spec with ``teacher_layers - keep`` main layers removed and/or its text encoder
    replaced (``None`` leaves a component as the teacher has it)."""
    spec = replace(teacher, name=name)
    if keep is not None:
        if not 1 <= keep <= teacher_layers:
            raise ValueError(f"keep must be between 1 and {teacher_layers}, not {keep}")
        dropped = teacher_layers - keep
        t = teacher.transformer
        spec = replace(
            spec,
            transformer=ComponentSpec(
                t.total_params - dropped * main_layer.total_params,
                t.quantizable_params - dropped * main_layer.quantizable_params,
                t.largest_unit_params,
            ),
        )
    if text_encoder is not None:
        spec = replace(
            spec,
            text_encoder=text_encoder,
            text_hidden=text_hidden or teacher.text_hidden,
            text_layers=text_layers or teacher.text_layers,
        )
    return spec


# The student the issue sizes for the smallest nodes: half the transformer's depth and a Qwen3-0.6B-
# shaped text encoder.
Z_IMAGE_TURBO_HALF_DEPTH_SMALL_TE = student_spec(
    Z_IMAGE_TURBO,
    name="Z-Image-Turbo student (15 of 30 layers, 0.6 B text encoder)",
    keep=Z_IMAGE_TURBO_MAIN_LAYERS // 2,
    text_encoder=QWEN3_SMALL_STUDENT,
    text_hidden=QWEN3_SMALL_STUDENT_HIDDEN,
    text_layers=QWEN3_SMALL_STUDENT_LAYERS,
)


def spec_of_student(teacher: ModelSpec, components: Mapping[str, Mapping[str, Any]]) -> ModelSpec:
    """The spec a student artifact stands for at ``teacher``'s scale, from its manifest's distillation
    record (torch-free: what the fleet's controller has). A transformer student keeps the same share of
    the teacher's main layers (2 of 4 in the shapes model stand for 15 of 30 in Z-Image-Turbo); a
    text-encoder student has the recorded share of the teacher's parameters (its activations are planned
    at the teacher's width: an over-estimate, never an under-one)."""
    keep = None
    transformer = components.get("transformer")
    if transformer is not None:
        kept, layers = int(transformer["recipe"]["keep"]), int(transformer["teacher_layers"])
        keep = max(1, round(Z_IMAGE_TURBO_MAIN_LAYERS * kept / layers))
    text_encoder = None
    text = components.get("text_encoder")
    if text is not None:
        ratio = float(text["params"]) / float(text["teacher_params"])
        t = teacher.text_encoder
        text_encoder = ComponentSpec(
            round(t.total_params * ratio), round(t.quantizable_params * ratio), round(t.largest_unit_params * ratio)
        )
    return student_spec(teacher, name=f"{teacher.name} student", keep=keep, text_encoder=text_encoder)
