"""``zimage-edge bench device`` / ``bench compare`` and the planner's calibration from their results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from quantize.bench_results import (
    ArtifactResult,
    BenchConfig,
    Cell,
    DeviceBenchResults,
    LoadResult,
    Prediction,
    read_results,
    write_results,
)
from quantize.calibration import MemoryCalibration, calibration_from_results
from quantize.planner import Placement, Workload, estimate, placement_bytes, plan
from quantize.profiles import get_profile
from quantize.specs import Z_IMAGE_TURBO
from quantize.variants import VARIANTS
from zimage_edge import cli
from zimage_edge.shapes import PRETRAINED

MIB = 2**20


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200
        assert image.size[1] > 200


@pytest.fixture(scope="module")
def tiny_bench(tiny_model_dir: Path, artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run over the tiny model's bf16 and int8 artifacts at 64 px, batches 1 and 2, one timed run."""
    roots = [artifacts.get(tiny_model_dir, v) for v in ("bf16", "int8")]
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "device", "--artifact", *map(str, roots), "--resolutions", "64", "--batch", "1,2"]
    assert cli.main([*argv, "--runs", "1", "--steps", "2", "--out", str(out), "--name", "tiny", "-q"]) == 0
    return out


def test_device_results_hold_every_measurement(tiny_bench: Path, tiny_model_dir: Path) -> None:
    results = read_results(tiny_bench / "tiny.json")
    assert results.device["kind"] == "cpu"
    assert results.policy["dtype"] == "float32"
    assert results.threads["intra_op"] == 1  # the suite's thread policy, applied by the command
    assert {"python", "torch", "diffusers", "optimum-quanto"} <= set(results.software)
    assert results.profile == "detected"
    assert results.budget_bytes > 0
    assert results.config.resolutions == [64]
    assert results.config.batches == [1, 2]
    assert [a.variant for a in results.artifacts] == ["bf16", "int8"]
    for artifact in results.artifacts:
        assert artifact.source == str(tiny_model_dir)
        assert artifact.load.seconds > 0
        assert artifact.load.peak_bytes >= artifact.load.loaded_bytes > 0
        assert [(c.width, c.batch, c.steps, c.runs) for c in artifact.cells] == [(64, 1, 2, 1), (64, 2, 2, 1)]
        for cell in artifact.cells:
            assert 0 < cell.latency_p50_s <= cell.latency_p95_s
            assert cell.images_per_s == pytest.approx(cell.batch / cell.latency_p50_s, rel=1e-3)
            assert cell.peak_abs_bytes > cell.peak_bytes > 0
            p = cell.predicted
            assert p.peak_bytes == p.weights_bytes + p.activation_bytes  # resident: all weights + the peak
            assert cell.relative_error == pytest.approx((p.peak_bytes - cell.peak_bytes) / cell.peak_bytes, abs=1e-4)
        quality = artifact.quality
        assert quality is not None
        assert quality.reference == str(tiny_model_dir)
        assert quality.adherence is None  # not a shapes model
        assert (quality.width, quality.height, quality.steps) == (64, 64, 2)
    bf16, int8 = results.artifacts
    assert int8.weight_bytes < bf16.weight_bytes
    assert int8.cells[0].predicted.weights_bytes < bf16.cells[0].predicted.weights_bytes
    assert bf16.quality.psnr_db_min > int8.quality.psnr_db_min > 20  # type: ignore[union-attr]
    # Both artifacts come from one reference: its images were drawn once, so the bf16 copy matches them.
    assert bf16.quality.ssim_min > 0.99  # type: ignore[union-attr]


def test_device_report_is_markdown_and_plots(tiny_bench: Path) -> None:
    text = (tiny_bench / "tiny.md").read_text()
    assert text.startswith("# Device benchmark: detected")
    assert "| variant | size | batch | p50 s | p95 s | images/s | peak MiB | planner MiB | error |" in text
    assert "| int8 | 64x64 | 2 |" in text
    assert "The planner was off by" in text
    assert "![tiny-latency](tiny-latency.png)" in text
    _valid_png(tiny_bench / "tiny-latency.png")
    _valid_png(tiny_bench / "tiny-memory.png")


def test_compare_renders_results_side_by_side(
    tiny_bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = read_results(tiny_bench / "tiny.json").model_copy(update={"profile": "l4-24gb"})
    write_results(other, tmp_path / "l4.json")
    out = tmp_path / "cmp"
    argv = ["bench", "compare", str(tiny_bench / "tiny.json"), str(tmp_path / "l4.json"), "--out", str(out)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("# Device benchmarks side by side")
    text = (out / "compare.md").read_text()
    assert "- **tiny**: detected" in text
    assert "- **l4**: l4-24gb" in text
    assert "| tiny p50 s | tiny images/s | tiny peak MiB | l4 p50 s |" in text
    assert "| bf16 | 64x64 | 1 |" in text
    assert "| int8 | 64x64 | 2 |" in text
    _valid_png(out / "compare.png")


def test_compare_refuses_a_file_that_is_not_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    assert cli.main(["bench", "compare", str(bad), "--out", str(tmp_path)]) == 2
    assert "is not a device benchmark results file" in capsys.readouterr().err


def test_shapes_model_is_scored_on_adherence(artifacts, tmp_path: Path) -> None:
    root = artifacts.get(PRETRAINED, "int8")
    argv = ["bench", "device", "--artifact", str(root), "--resolutions", "64", "--batch", "1", "--runs", "1"]
    assert cli.main([*argv, "--adherence-scenes", "9", "--out", str(tmp_path), "-q"]) == 0
    (artifact,) = read_results(tmp_path / "device-cpu.json").artifacts
    quality = artifact.quality
    assert quality is not None
    assert quality.adherence is not None
    assert quality.reference_adherence is not None
    assert quality.adherence["samples"] == quality.reference_adherence["samples"] == 9
    assert quality.adherence["color_accuracy"] >= quality.reference_adherence["color_accuracy"] - 0.12
    assert "adherence color / shape" in (tmp_path / "device-cpu.md").read_text()


def test_a_plain_directory_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "device", "--artifact", str(tiny_model_dir), "--resolutions", "64", "--out", str(tmp_path)]
    assert cli.main([*argv, "-q"]) == 2
    assert "is not an artifact" in capsys.readouterr().err


def _results(cells: list[tuple[int, int, int, int]], profile: str = "l4-24gb") -> DeviceBenchResults:
    """(predicted weights, predicted activations, held once loaded, measured peak) per cell, in MiB."""
    artifacts = []
    for i, (weights, act, held, peak) in enumerate(cells):
        predicted = Prediction(
            weights_bytes=weights * MIB, activation_bytes=act * MIB, peak_bytes=(weights + act) * MIB
        )
        cell = Cell(
            width=512, height=512, batch=1, steps=8, runs=1, latency_p50_s=1.0, latency_p95_s=1.0, images_per_s=1.0,
            peak_bytes=peak * MIB, peak_abs_bytes=peak * MIB, predicted=predicted,
            relative_error=(weights + act - peak) / peak,
        )  # fmt: skip
        load = LoadResult(seconds=1.0, peak_bytes=held * MIB, loaded_bytes=held * MIB, baseline_bytes=0)
        artifacts.append(
            ArtifactResult(
                path=f"a{i}",
                artifact_id="0" * 64,
                variant=f"v{i}",
                source="s",
                weight_bytes=weights * MIB,
                load=load,
                cells=[cell],
            )
        )
    return DeviceBenchResults(
        created_at="2025-01-01T00:00:00Z",
        device={"kind": "cuda", "name": "NVIDIA L4", "total_memory": 24 * 2**30, "free_memory": 23 * 2**30,
                "compute_capability": [8, 9], "unified_memory": False, "system_memory": 64 * 2**30},
        policy={"dtype": "bfloat16"}, threads={}, software={}, memory_meter="cuda", profile=profile,
        budget_bytes=20 * 2**30,
        config=BenchConfig(resolutions=[512], batches=[1], steps=8, runs=1, max_sequence_length=512, quality=False,
                           adherence_scenes=None),
        artifacts=artifacts,
    )  # fmt: skip


def test_calibration_fits_the_measured_points() -> None:
    # Two variants: held memory 100 and 60 MiB over predicted weights; activations 2x and 1.5x predicted.
    results = _results([(1000, 200, 1100, 1500), (500, 100, 560, 710)])
    calibration = calibration_from_results(results, source="l4.json")
    assert calibration.overhead_bytes == 100 * MIB
    assert calibration.activation_scale == pytest.approx(2.0)
    assert (calibration.profile, calibration.device, calibration.points) == ("l4-24gb", "NVIDIA L4", 2)
    for artifact in results.artifacts:
        for cell in artifact.cells:  # calibrated, the model under-predicts no point it was fitted on
            p = cell.predicted
            assert p.weights_bytes + calibration.overhead_bytes + 2.0 * p.activation_bytes >= cell.peak_bytes


def test_calibration_raises_every_device_need_by_its_fit() -> None:
    calibration = MemoryCalibration(activation_scale=1.5, overhead_bytes=300 * MIB)
    workload = Workload(1024, 1024)
    plain = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", workload)
    fitted = estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", workload, calibration)
    assert fitted.weights == plain.weights
    assert fitted.activations["vae"] == int(plain.activations["vae"] * 1.5)
    resident = placement_bytes(plain, Placement.RESIDENT)[0]
    peak = max(plain.activations["transformer"], plain.activations["vae"])
    assert placement_bytes(fitted, Placement.RESIDENT)[0] == pytest.approx(resident + 300 * MIB + 0.5 * peak, abs=4)
    # Without a calibration nothing changes (the planner's own tests pin those numbers).
    assert (
        placement_bytes(estimate(Z_IMAGE_TURBO, VARIANTS["int8"], "bfloat16", workload, None), Placement.RESIDENT)[0]
        == resident
    )
    # Enough extra memory turns the L4's choice from bf16 to a smaller variant, and the plan says why.
    heavy = MemoryCalibration(activation_scale=1.0, overhead_bytes=4 * 2**30, device="NVIDIA L4", source="l4.json")
    result = plan(get_profile("l4-24gb"), workload, calibration=heavy)
    assert plan(get_profile("l4-24gb"), workload).choice.variant == "bf16"  # type: ignore[union-attr]
    assert result.choice is not None
    assert result.choice.variant != "bf16"
    assert "calibrated on NVIDIA L4 from l4.json" in result.explain()


def test_plan_command_takes_a_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_results(_results([(1000, 200, 1100, 1500)]), tmp_path / "l4.json")
    assert cli.main(["plan", "--calibration", str(path), "--resolution", "512x512", "--json"]) == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed["profile"] == "l4-24gb"  # the profile the results were measured as
    assert printed["calibration"]["activation_scale"] == pytest.approx((1500 - 1100) / 200)
    assert printed["calibration"]["overhead_bytes"] == 100 * MIB
    # A calibration belongs to the device it was measured on.
    assert cli.main(["plan", "--calibration", str(path), "--device", "t4-16gb"]) == 2
    assert "measured as profile 'l4-24gb', not 't4-16gb'" in capsys.readouterr().err


def test_plan_calibrates_from_a_real_run(tiny_bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = read_results(tiny_bench / "tiny.json")
    calibration = calibration_from_results(results)
    assert calibration.points == 4
    for artifact in results.artifacts:
        for cell in artifact.cells:
            p = cell.predicted
            calibrated = (
                p.weights_bytes + calibration.overhead_bytes + calibration.activation_scale * p.activation_bytes
            )
            assert calibrated >= cell.peak_bytes
    assert cli.main(["plan", "--calibration", str(tiny_bench / "tiny.json"), "--json"]) == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed["profile"] == "detected"
    assert printed["calibration"]["points"] == 4


def test_bench_commands_register_without_torch() -> None:
    code = (
        "import sys; import zimage_edge.cli, quantize.bench_cli, quantize.bench_report, quantize.bench_results; "
        "p = zimage_edge.cli.build_parser(); p.parse_args(['bench', 'compare', 'x.json']); "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
