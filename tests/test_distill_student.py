"""The distilled shapes student shipped in the package: as adherent as the issue asks, and so is its int8."""

from __future__ import annotations

import json
from pathlib import Path

from quantize.distill.build import shapes_adherence
from quantize.distill.recipe import read_student_info
from tests.conftest import CPU_FACTS
from zimage_edge.model.loading import load_pipeline
from zimage_edge.shapes import PRETRAINED, STUDENT
from zimage_edge.shapes.data import MARKER

# Shape accuracy below the teacher's that the shipped student stays within: the 10 points.
SHAPE_GAP = 0.10


def test_the_shipped_student_draws_what_it_is_asked_and_so_does_its_int8(tmp_path: Path) -> None:
    from quantize.build import BuildOptions, build_artifact
    from quantize.load import load_artifact
    from quantize.variants import get_variant

    info = read_student_info(STUDENT)
    assert info is not None
    assert set(info.components) == {"transformer", "text_encoder"}
    teacher_config = json.loads((PRETRAINED / "transformer" / "config.json").read_text())
    student_config = json.loads((STUDENT / "transformer" / "config.json").read_text())
    assert student_config["n_layers"] * 2 == teacher_config["n_layers"]  # half depth
    assert info.components["text_encoder"]["params_ratio"] <= 1 / 3

    # The teacher's adherence at the same settings (every caption, 8 steps, seed 1000), from its record.
    teacher = json.loads((PRETRAINED / MARKER).read_text())["adherence"]
    student = shapes_adherence(load_pipeline(STUDENT, facts=CPU_FACTS).pipe)
    assert student["all"]["samples"] == 90
    assert student["all"]["color_accuracy"] >= 0.90
    assert student["held_out"]["color_accuracy"] >= 0.90
    # Within 10 points of the teacher's shape accuracy (measured: 0.722 against 0.733, benchmarks/distill.md).
    assert student["all"]["shape_accuracy"] >= teacher["shape_accuracy"] - SHAPE_GAP

    manifest = build_artifact(STUDENT, get_variant("int8"), tmp_path / "student-int8",
                              BuildOptions(quality=None, force=True, facts=CPU_FACTS))  # fmt: skip
    assert manifest.variant_name == "student-int8"
    assert manifest.distillation is not None
    assert manifest.distillation.teacher_id == info.teacher_id
    int8 = shapes_adherence(load_artifact(tmp_path / "student-int8", facts=CPU_FACTS).pipe)
    for metric in ("color_accuracy", "shape_accuracy"):
        assert int8["all"][metric] >= student["all"][metric] - 0.03, metric
