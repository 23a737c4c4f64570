"""Students in the planner and the fleet: sized by their own parameter counts, chosen where they fit best."""

from __future__ import annotations

from fleet.rollout import ReleaseVariant, choose_variant
from quantize.distill.spec import (
    QWEN3_SMALL_STUDENT,
    Z_IMAGE_TURBO_HALF_DEPTH_SMALL_TE,
    Z_IMAGE_TURBO_MAIN_LAYER,
    student_spec,
)
from quantize.planner import Workload, estimate, plan, plan_variants
from quantize.profiles import PROFILES
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VARIANTS, VariantRecipe, student_variant

STUDENT = Z_IMAGE_TURBO_HALF_DEPTH_SMALL_TE
STUDENT_INT8 = student_variant(VARIANTS["int8"])


def test_student_spec_removes_layers_and_swaps_the_text_encoder() -> None:
    half = student_spec(Z_IMAGE_TURBO, name="half", keep=15)
    assert (
        half.transformer.total_params
        == Z_IMAGE_TURBO.transformer.total_params - 15 * Z_IMAGE_TURBO_MAIN_LAYER.total_params
    )
    assert half.text_encoder == Z_IMAGE_TURBO.text_encoder
    # Counted on the meta device: 15 layers of the real transformer, a Qwen3-0.6B-shaped encoder.
    assert STUDENT.transformer.total_params == 3_441_253_696
    assert STUDENT.text_encoder == QWEN3_SMALL_STUDENT
    assert STUDENT.text_encoder.total_params < Z_IMAGE_TURBO.text_encoder.total_params / 3


def test_student_variants_are_named_and_ranked_after_the_full_models() -> None:
    assert STUDENT_INT8.name == "student-int8"
    assert STUDENT_INT8.transformer == VARIANTS["int8"].transformer
    assert all(STUDENT_INT8.quality_rank > v.quality_rank for v in VARIANTS.values())
    assert student_variant(STUDENT_INT8) is STUDENT_INT8
    # As read back from a manifest.
    assert VariantRecipe.from_dict(STUDENT_INT8.to_dict()).quality_rank == STUDENT_INT8.quality_rank


def test_plan_variants_with_one_spec_is_plan() -> None:
    for profile in ("jetson-orin-nano-8gb", "t4-16gb", "a10-24gb"):
        variants = [VARIANTS[n] for n in ("bf16", "int8", "int4", "int4-te8")]
        same = plan_variants(PROFILES[profile], None, [(v, Z_IMAGE_TURBO) for v in variants])
        assert same.rows == plan(PROFILES[profile], None, Z_IMAGE_TURBO, variants).rows


def test_the_smallest_node_gets_the_student_and_a_large_one_the_full_model() -> None:
    candidates = [(VARIANTS["int4"], Z_IMAGE_TURBO), (STUDENT_INT8, STUDENT)]
    nano = plan_variants(PROFILES["jetson-orin-nano-8gb"], None, candidates)
    assert nano.choice is not None
    assert nano.choice.variant == "student-int8"
    assert nano.choice.placement == "te_freed"  # the text encoder is freed before denoising
    # int4 of the full model does not fit the Nano at all; the student's int8 weights are smaller.
    assert not any(row.fits for row in nano.rows if row.variant == "int4")
    a10 = plan_variants(PROFILES["a10-24gb"], None, candidates)
    assert a10.choice is not None
    assert a10.choice.variant == "int4"


def release() -> list[ReleaseVariant]:
    def size(recipe: VariantRecipe, spec=Z_IMAGE_TURBO) -> int:
        return estimate(spec, recipe, recipe.storage_dtype, Workload()).total_weights

    return [
        ReleaseVariant(VARIANTS["int4"], "a" * 64, size(VARIANTS["int4"])),
        ReleaseVariant(STUDENT_INT8, "b" * 64, size(STUDENT_INT8, STUDENT), model=STUDENT),
    ]


def test_the_fleet_sends_the_student_to_the_nano_and_int4_to_the_t4() -> None:
    nano = choose_variant(PROFILES["jetson-orin-nano-8gb"].facts(), release())
    assert nano.variant == "student-int8"
    assert nano.explanation.startswith("student-int8 with placement ")
    assert choose_variant(PROFILES["t4-16gb"].facts(), release()).variant == "int4"
    # Without its own sizes the student is planned as the full model and does not fit the Nano.
    unsized = [ReleaseVariant(v.recipe, v.artifact, v.bytes) for v in release()]
    assert choose_variant(PROFILES["jetson-orin-nano-8gb"].facts(), unsized).variant is None
