"""Reports of device benchmark results: Markdown tables, PNG plots, and several results side by side.

Torch-free; matplotlib is imported only by the plotting functions (with its file-only Agg backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantize.bench_results import ArtifactResult, Cell, DeviceBenchResults
from quantize.calibration import MemoryCalibration, calibration_from_results

MIB = 2**20


def _mib(value: int) -> str:
    return f"{value / MIB:.1f}"


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def _calibrated_peak(cell: Cell, calibration: MemoryCalibration) -> int:
    p = cell.predicted
    return int(p.weights_bytes + calibration.overhead_bytes + calibration.activation_scale * p.activation_bytes)


def _quality_cells(artifact: ArtifactResult) -> list[str]:
    q = artifact.quality
    if q is None:
        return ["—", "—", "—"]
    adherence = "—"
    if q.adherence is not None and q.reference_adherence is not None:
        mine, ref = q.adherence["color_accuracy"], q.reference_adherence["color_accuracy"]
        adherence = f"{mine:.3f} / {q.adherence['shape_accuracy']:.3f} (ref {ref:.3f} / "
        adherence += f"{q.reference_adherence['shape_accuracy']:.3f})"
    return [f"{q.psnr_db_mean:.1f} (min {q.psnr_db_min:.1f})", f"{q.ssim_mean:.4f}", adherence]


def markdown(results: DeviceBenchResults, plots: Sequence[str] = ()) -> str:
    """The results as Markdown: device, artifacts (load, quality), latency and memory by cell, and the
    planner's prediction against the measured peak."""
    c = results.config
    d = results.device
    lines = [
        f"# Device benchmark: {results.label()}",
        "",
        f"{d.get('kind')} `{d.get('name')}`, compute {results.policy.get('dtype')}, torch threads "
        f"{results.threads.get('intra_op')} ({results.threads.get('policy')}); memory: {results.memory_meter}; "
        f"budget of profile `{results.profile}`: {_mib(results.budget_bytes)} MiB.",
        "Software: " + ", ".join(f"{k} {v}" for k, v in results.software.items()) + ".",
        f"{c.steps} steps, {c.runs} timed runs per cell after one warm-up, max_sequence_length "
        f"{c.max_sequence_length}; measured {results.created_at}.",
        "",
        "## Artifacts",
        "",
        "| variant | weights MiB | cold load s | load peak MiB | held MiB | PSNR dB | SSIM | adherence color / shape |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in results.artifacts:
        lines.append(
            "| " + " | ".join([
                a.variant, _mib(a.weight_bytes), f"{a.load.seconds:.2f}", _mib(a.load.peak_bytes),
                _mib(a.load.loaded_bytes), *_quality_cells(a),
            ]) + " |"
        )  # fmt: skip
    calibration = calibration_from_results(results)
    lines += [
        "",
        "## Latency and memory",
        "",
        "Peak: memory during generation above the level before loading. Planner: its memory model for the "
        "variant with everything resident; error = (planner - measured) / measured. Calibrated: the model "
        f"after `zimage-edge plan --calibration` with these results ({calibration.describe()}).",
        "",
        "| variant | size | batch | p50 s | p95 s | images/s | peak MiB | planner MiB | error | calibrated MiB "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in results.artifacts:
        for cell in a.cells:
            calibrated = _calibrated_peak(cell, calibration)
            error = (calibrated - cell.peak_bytes) / cell.peak_bytes if cell.peak_bytes > 0 else 0.0
            lines.append(
                "| " + " | ".join([
                    a.variant, f"{cell.width}x{cell.height}", str(cell.batch), f"{cell.latency_p50_s:.4f}",
                    f"{cell.latency_p95_s:.4f}", f"{cell.images_per_s:.2f}", _mib(cell.peak_bytes),
                    _mib(cell.predicted.peak_bytes), _pct(cell.relative_error), _mib(calibrated), _pct(error),
                ]) + " |"
            )  # fmt: skip
    errors = [cell.relative_error for a in results.artifacts for cell in a.cells]
    worst = max(errors, key=abs)
    lines += ["", f"The planner was off by {_pct(worst)} at worst (mean |error| {_pct(_mean_abs(errors))[1:]})."]
    lines += [f"\n![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _mean_abs(values: Sequence[float]) -> float:
    return sum(abs(v) for v in values) / len(values) if values else 0.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _latency_axes(ax: Any, results: DeviceBenchResults, prefix: str = "") -> None:
    for a in results.artifacts:
        for batch in results.config.batches:
            cells = sorted((c for c in a.cells if c.batch == batch), key=lambda c: c.width)
            label = f"{prefix}{a.variant}" + (f" x{batch}" if len(results.config.batches) > 1 else "")
            ax.plot([c.width for c in cells], [c.latency_p50_s for c in cells], marker="o", label=label)


def plot_latency(results: DeviceBenchResults, path: Path) -> Path:
    """Median latency against resolution, one line per variant (and batch size)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _latency_axes(ax, results)
    ax.set_xlabel("resolution (px per side)")
    ax.set_ylabel(f"p50 seconds per call ({results.config.steps} steps)")
    ax.set_title(f"latency on {results.label()}")
    ax.set_xticks(results.config.resolutions)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(results: DeviceBenchResults, path: Path) -> Path:
    """Peak memory per variant (loading, and the largest cell) and the planner's prediction for that
    cell, against the device's budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [a.variant for a in results.artifacts]
    largest = [max(a.cells, key=lambda c: c.peak_bytes) for a in results.artifacts]
    xs = range(len(names))
    width = 0.27
    ax.bar([x - width for x in xs], [a.load.peak_bytes / MIB for a in results.artifacts], width, label="load peak")
    ax.bar(list(xs), [c.peak_bytes / MIB for c in largest], width, label="generation peak (largest cell)")
    ax.bar([x + width for x in xs], [c.predicted.peak_bytes / MIB for c in largest], width, label="planner")
    ax.axhline(results.budget_bytes / MIB, color="red", linestyle="--", label=f"budget ({results.profile})")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("MiB")
    ax.set_yscale("log")
    ax.set_title(f"memory on {results.label()}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: DeviceBenchResults, out: Path, name: str) -> dict[str, Path]:
    """``name.json``, ``name.md``, ``name-latency.png`` and ``name-memory.png`` under ``out``."""
    from quantize.bench_results import write_results

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_results(results, out / f"{name}.json"),
        "latency": plot_latency(results, out / f"{name}-latency.png"),
        "memory": plot_memory(results, out / f"{name}-memory.png"),
    }
    paths["markdown"] = out / f"{name}.md"
    paths["markdown"].write_text(markdown(results, [str(paths["latency"]), str(paths["memory"])]))
    return paths


def compare_markdown(runs: Sequence[tuple[str, DeviceBenchResults]]) -> str:
    """Several results side by side: one row per (variant, size, batch), one column group per run."""
    header = ["variant", "size", "batch"]
    for label, _ in runs:
        header += [f"{label} p50 s", f"{label} images/s", f"{label} peak MiB"]
    lines = [
        "# Device benchmarks side by side",
        "",
        *(f"- **{label}**: {r.label()}, {r.policy.get('dtype')}, {r.created_at}" for label, r in runs),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    keys: list[tuple[str, int, int]] = []
    cells: dict[tuple[int, str, int, int], Cell] = {}
    for i, (_, r) in enumerate(runs):
        for a in r.artifacts:
            for c in a.cells:
                key = (a.variant, c.width, c.batch)
                if key not in keys:
                    keys.append(key)
                cells[(i, *key)] = c
    for variant, size, batch in sorted(keys):
        row = [variant, f"{size}x{size}", str(batch)]
        for i in range(len(runs)):
            found = cells.get((i, variant, size, batch))
            row += (
                ["—"] * 3
                if found is None
                else [f"{found.latency_p50_s:.4f}", f"{found.images_per_s:.2f}", _mib(found.peak_bytes)]
            )
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| run | variant | cold load s | PSNR dB | SSIM |", "|---|---|---|---|---|"]
    for label, r in runs:
        for a in r.artifacts:
            psnr, ssim, _ = _quality_cells(a)
            lines.append(f"| {label} | {a.variant} | {a.load.seconds:.2f} | {psnr} | {ssim} |")
    return "\n".join(lines) + "\n"


def plot_compare(runs: Sequence[tuple[str, DeviceBenchResults]], path: Path) -> Path:
    """Latency against resolution for every run and variant, and peak memory per run and variant."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in runs:
        _latency_axes(left, r, prefix=f"{label}: ")
    left.set_xlabel("resolution (px per side)")
    left.set_ylabel("p50 seconds per call")
    left.set_yscale("log")
    left.grid(alpha=0.3)
    left.legend(fontsize="x-small")
    bars = [(f"{label}\n{a.variant}", a.peak_bytes / MIB) for label, r in runs for a in r.artifacts]
    right.bar(range(len(bars)), [v for _, v in bars])
    right.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize="x-small", rotation=45, ha="right")
    right.set_ylabel("peak MiB (load or generation)")
    fig.suptitle("device benchmarks side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short labels for results files: their stems, made unique."""
    labels: list[str] = []
    for path in paths:
        label = Path(path).stem
        while label in labels:
            label += "'"
        labels.append(label)
    return labels
