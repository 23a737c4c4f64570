"""Teacher against its distilled students: the shipped shapes model and its student, each also as int8.

    python benchmarks/distill.py [--runs 10] [--out benchmarks/results]

Configurations: the teacher; the transformer student alone (half depth, the teacher's text encoder);
the text-encoder student alone (the teacher's transformer); both (the shipped student). Each is
measured as its bf16 checkpoint and as its int8 artifact made by the quantize pipeline
(``int8`` for the teacher, ``student-int8`` for the students). Every configuration runs in a fresh
interpreter, one after another in one run, so peak memory is its own and latencies are comparable:
latency is per image at batch 1 (median of ``--runs``, after a warm-up) and reported as a ratio to
the teacher's in the same run. Adherence: all 90 captions, 8 steps, seed 1000. Then the planner's
estimate for the real model with half the depth and a Qwen3-0.6B-shaped text encoder on an Orin Nano
8 GB and an Orin NX 16 GB. Results: ``benchmarks/results/distill.json`` and ``benchmarks/distill.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import RESULTS, run_fresh, write_results

MARKDOWN = Path(__file__).parent / "distill.md"
CONFIGS = ("teacher", "transformer student", "text-encoder student", "both (shipped student)")
# Captions timed at batch 1: one per shape, mixed colors.
TIMED = ("a red circle on a blue background", "a green square on a white background",
         "a yellow triangle on a black background")  # fmt: skip


def assemble(work: Path) -> dict[str, Path]:
    """Model directories of the four configurations (the two single-component students are the
    teacher's directory with one component taken from the shipped student)."""
    from quantize.distill.recipe import StudentInfo, read_student_info, write_student_info
    from zimage_edge.shapes import PRETRAINED, STUDENT

    info = read_student_info(STUDENT)
    assert info is not None
    dirs = {"teacher": PRETRAINED, "both (shipped student)": STUDENT}
    for config, component in (("transformer student", "transformer"), ("text-encoder student", "text_encoder")):
        out = work / component
        shutil.copytree(PRETRAINED, out)
        shutil.rmtree(out / component)
        shutil.copytree(STUDENT / component, out / component)
        index = json.loads((out / "model_index.json").read_text())
        index[component] = json.loads((STUDENT / "model_index.json").read_text())[component]
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        one = StudentInfo(info.teacher_id, info.teacher_sha256, {component: info.components[component]}, {})
        write_student_info(out, one)
        dirs[config] = out
    return dirs


def child(kind: str, path: str, runs: int) -> dict[str, Any]:
    """One configuration in this (fresh) process: load, time, score, read the peak."""
    import torch

    from quantize.distill.build import shapes_adherence
    from quantize.peak_memory import PeakMeter
    from zimage_edge.cpu import CpuSettings, configure_threads
    from zimage_edge.model.generate import generate
    from zimage_edge.request import GenerationRequest
    from zimage_edge.shapes.evaluate import PROMPT_TOKENS

    threads = configure_threads(CpuSettings())
    meter = PeakMeter("cpu")
    baseline = meter.reset()
    if kind == "artifact":
        from quantize.load import load_artifact

        pipe = load_artifact(Path(path)).pipe
    else:
        from zimage_edge.model.loading import load_pipeline

        pipe = load_pipeline(Path(path)).pipe
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "text_encoder", "vae")}  # fmt: skip

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, width=64, height=64, seed=1000, max_sequence_length=PROMPT_TOKENS)

    generate(pipe, request(TIMED[0]))  # warm-up
    seconds = []
    for i in range(runs):
        started = time.perf_counter()
        generate(pipe, request(TIMED[i % len(TIMED)]))
        seconds.append(time.perf_counter() - started)
    with torch.no_grad():
        adherence = shapes_adherence(pipe)
    return {
        "params": params,
        "latency_s_median": statistics.median(seconds),
        "latency_s": seconds,
        "peak_rss": meter.peak(),
        "baseline_rss": baseline,
        "peak_method": meter.method,
        "threads": threads.reason,
        "adherence": adherence,
    }


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.safetensors"))


def measure(runs: int, work: Path) -> list[dict[str, Any]]:
    from quantize.build import BuildOptions, build_artifact
    from quantize.quality import QualitySpec
    from quantize.variants import get_variant

    rows = []
    for config, directory in assemble(work).items():
        int8_dir = work / f"{config.split()[0]}-int8"
        options = BuildOptions(quality=QualitySpec(prompts=TIMED, width=64, height=64), force=True)
        manifest = build_artifact(directory, get_variant("int8"), int8_dir, options)
        for form, path, kind in (("bf16", directory, "dir"), (manifest.variant_name, int8_dir, "artifact")):
            result = run_fresh(__file__, "--child", kind, str(path), "--runs", str(runs))
            if "error" in result:
                raise RuntimeError(f"{config} {form}: {result['error']}\n{result['stderr']}")
            row = {"config": config, "form": form, "file_bytes": weight_bytes(path), **result}
            if form != "bf16":
                row["psnr_db_mean_vs_bf16"] = manifest.quality.psnr_db_mean
                row["ssim_mean_vs_bf16"] = manifest.quality.ssim_mean
            rows.append(row)
            print(f"{config:24s} {form:14s} {row['latency_s_median'] * 1000:7.1f} ms/image", file=sys.stderr)
    teacher = rows[0]["latency_s_median"]
    for row in rows:
        row["latency_ratio_to_teacher"] = row["latency_s_median"] / teacher
    return rows


def planner_estimate() -> dict[str, Any]:
    """The planner on the real model: the full model's variants and the student's, side by side."""
    from quantize.distill.spec import Z_IMAGE_TURBO_HALF_DEPTH_SMALL_TE as STUDENT
    from quantize.planner import Workload, estimate, plan_variants
    from quantize.profiles import PROFILES
    from quantize.specs import Z_IMAGE_TURBO
    from quantize.variants import VARIANTS, student_variant
    from zimage_edge.device import GIB

    full = [VARIANTS[n] for n in ("bf16", "int8", "int4", "int4-te8", "int4-te4")]
    students = [student_variant(VARIANTS[n]) for n in ("bf16", "int8", "int8-te8", "int4", "int4-te8")]
    candidates = [(v, Z_IMAGE_TURBO) for v in full] + [(v, STUDENT) for v in students]
    out: dict[str, Any] = {
        "student": {
            "name": STUDENT.name,
            "transformer_params": STUDENT.transformer.total_params,
            "text_encoder_params": STUDENT.text_encoder.total_params,
            "teacher_transformer_params": Z_IMAGE_TURBO.transformer.total_params,
            "teacher_text_encoder_params": Z_IMAGE_TURBO.text_encoder.total_params,
        },
        "weights_gib": {
            v.name: round(estimate(spec, v, "bfloat16", Workload()).total_weights / GIB, 2) for v, spec in candidates
        },
        "profiles": {},
    }
    for name in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb"):
        profile = PROFILES[name]
        result = plan_variants(profile, Workload(), candidates)
        full_only = plan_variants(profile, Workload(), candidates[: len(full)])
        out["profiles"][name] = {
            "description": profile.description,
            "choice": result.explain(),
            "choice_full_model_only": full_only.explain(),
            "rows": [
                {"variant": r.variant, "placement": str(r.placement), "device_gib": round(r.device_bytes / GIB, 2),
                 "budget_gib": round(r.budget_bytes / GIB, 2), "fits": r.fits, "reason": r.reason}
                for r in result.rows
                if str(r.placement) in ("resident", "te_freed")
            ],
        }  # fmt: skip
    return out


def _pct(value: float) -> str:
    return f"{value:.3f}"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for the shipped student, checked against this run's numbers."""
    by = {(r["config"], r["form"] if r["form"] == "bf16" else "int8"): r["adherence"] for r in rows}
    teacher, student = by[("teacher", "bf16")]["all"], by[("both (shipped student)", "bf16")]
    int8 = by[("both (shipped student)", "int8")]["all"]
    shape_gap = teacher["shape_accuracy"] - student["all"]["shape_accuracy"]
    int8_gap = max(abs(int8[m] - student["all"][m]) for m in ("color_accuracy", "shape_accuracy"))

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return [
        "Targets for the shipped student (both components distilled):",
        f"- color accuracy >= 0.90 on the 90 captions: {student['all']['color_accuracy']:.3f}, "
        f"{verdict(student['all']['color_accuracy'] >= 0.90)}; on the held-out captions: "
        f"{student['held_out']['color_accuracy']:.3f}, {verdict(student['held_out']['color_accuracy'] >= 0.90)};",
        f"- shape accuracy within 10 points of the teacher's: {abs(shape_gap) * 100:.1f} points "
        f"{'below' if shape_gap > 0 else 'above'}, "
        f"{verdict(shape_gap <= 0.10)};",
        f"- its int8 variant within 3 points of it (color and shape): {int8_gap * 100:.1f} points, "
        f"{verdict(int8_gap <= 0.03)}.",
    ]


def table(rows: list[dict[str, Any]], plan: dict[str, Any]) -> str:
    lines = [
        "# Distillation: the shapes model and its students",
        "",
        "Generated by `python benchmarks/distill.py` (one run; every configuration in a fresh process,",
        f"{rows[0]['threads']}). Latency: one 64x64 image at batch 1, 8 steps, median of "
        f"{len(rows[0]['latency_s'])} runs, as a ratio to the teacher bf16 in the same run. Adherence: all 90",
        "captions at seed 1000 (held-out: the 10 captions neither the teacher nor the students trained on).",
        "Peak memory is the process's peak RSS (libraries included); parameters are the three weight",
        "components.",
        "",
        "| configuration | form | params (tr / te / total) | weight files | peak RSS | latency vs teacher | "
        "color | shape | held-out color | held-out shape |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["params"]
        a, h = r["adherence"]["all"], r["adherence"]["held_out"]
        lines.append(
            f"| {r['config']} | {r['form']} | {p['transformer']:,} / {p['text_encoder']:,} / {sum(p.values()):,} | "
            f"{r['file_bytes'] / 2**20:.2f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | "
            f"{r['latency_ratio_to_teacher']:.2f} ({r['latency_s_median'] * 1000:.0f} ms) | "
            f"{_pct(a['color_accuracy'])} | {_pct(a['shape_accuracy'])} | "
            f"{_pct(h['color_accuracy'])} | {_pct(h['shape_accuracy'])} |"
        )
    lines += ["", *targets(rows)]
    s = plan["student"]
    lines += [
        "",
        "## The real model: half depth and a small text encoder, as the planner sees it",
        "",
        f"Student: {s['transformer_params'] / 1e9:.2f} B transformer parameters (of "
        f"{s['teacher_transformer_params'] / 1e9:.2f} B: 15 of 30 main layers, refiners and embedders kept), "
        f"{s['text_encoder_params'] / 1e9:.2f} B text encoder (of {s['teacher_text_encoder_params'] / 1e9:.2f} B: "
        "the Qwen3-0.6B shape, same tokenizer, plus a 1024 -> 2560 projection). 1024x1024, batch 1, bf16 compute.",
        "",
        "| variant | weights |",
        "|---|---|",
        *[f"| {name} | {gib:.2f} GiB |" for name, gib in plan["weights_gib"].items()],
        "",
    ]
    for profile in plan["profiles"].values():
        lines += [
            f"### {profile['description']}",
            "",
            f"- With students in the release: {profile['choice']}.",
            f"- Full model only: {profile['choice_full_model_only']}.",
            "",
            "| variant | placement | device peak | budget | fits |",
            "|---|---|---|---|---|",
            *[
                f"| {r['variant']} | {r['placement']} | {r['device_gib']:.2f} GiB | {r['budget_gib']:.2f} GiB | "
                f"{'yes' if r['fits'] else r['reason']} |"
                for r in profile["rows"]
            ],
            "",
        ]
    lines += [
        "Compute per image scales with the layers that run: the student's transformer runs 15 + 4 of the",
        "teacher's 30 + 4 blocks (main + refiners) per step, about 0.56x the teacher's transformer time;",
        "its text encoder about 0.15x of Qwen3-4B's. An estimate from the architecture, not a measurement",
        "on a Jetson.",
        "",
        "## Real weights",
        "",
        "The same commands, with a prompt list (one prompt per line) instead of the shapes captions:",
        "",
        "```",
        "zimage-edge distill transformer --teacher Tongyi-MAI/Z-Image-Turbo --keep 15 --out zit-student-tr \\",
        "    --prompts prompts.txt --size 512 --max-sequence-length 512 --seeds-per-prompt 1 --steps 20000 \\",
        "    --batch 8 --lr 1e-4",
        "zimage-edge distill text-encoder --teacher zit-student-tr --layers 28 --hidden 1024 --intermediate 3072 \\",
        "    --heads 16 --kv-heads 8 --prompts prompts.txt --max-sequence-length 512 --steps 50000 --batch 32 \\",
        "    --lr 3e-4 --out zit-student",
        "zimage-edge quantize zit-student --variant int8 --out zit-student-int8   # -> student-int8",
        "```",
        "",
        "GPU time, estimated from FLOPs (not measured: 2 x params x tokens per forward, a backward twice",
        "that, attention left out, 40% of an H100's dense bf16 peak, ~4e14 FLOP/s). At 512x512 (1024 image",
        "+ 512 caption tokens) the teacher's forward is ~1.9e13 FLOP and a training sample (the student's",
        "forward and backward plus the teacher's forward for its targets) ~5e13: 20000 steps x batch 8 is",
        "~8e18, the teacher's trajectories for 10000 prompts x 8 steps ~1.5e18, so ~7 GPU-hours; at",
        "1024x1024 (4608 tokens) three to four times that. The text encoder (Qwen3-4B teacher forward and",
        "0.6 B student forward and backward, 512 tokens) is ~6e12 FLOP per prompt: 50000 steps of 32 prompts",
        "~7 GPU-hours. Memory: the student transformer trains in fp32 with AdamW (~55 GB for weights,",
        "gradients and optimizer states of 3.4 B parameters) beside the bf16 teacher (12.3 GB), so one",
        "80 GB GPU; trajectories and caption features are kept in host memory (~21 GB for 10000 prompts x",
        "1 seed x 8 steps at 512x512: pass --seeds-per-prompt 1).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed images per configuration (default 10)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.runs)))
        return
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        rows = measure(args.runs, Path(tmp))
    plan = planner_estimate()
    text = table(rows, plan)
    write_results(args.out, "distill", {"rows": rows, "planner": plan})
    MARKDOWN.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
