"""From a teacher directory to a student directory: corpus, distillation, quality against the teacher, save.

The student directory is an ordinary diffusers pipeline (``zimage-edge quantize`` and ``serve`` take it):
the teacher's components with the distilled one replaced, bf16 weights, plus ``zimage_edge_student.json``
(teacher identity, recipe, measured quality). A student of a student keeps the first teacher's identity
and adds its component to the record, so "transformer then text encoder" makes one student of both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.distill.progress import Report, write_loss_curve
from quantize.distill.recipe import (
    STUDENT_MARKER,
    StudentInfo,
    TextEncoderRecipe,
    TransformerRecipe,
    read_student_info,
    write_student_info,
)
from quantize.manifest import hash_tree, tree_digest
from zimage_edge.shapes.data import MARKER as SHAPES_MARKER

# Where a run keeps its checkpoint and loss curves unless told otherwise: beside the output.
WORK_SUFFIX = ".distill-work"


@dataclass(frozen=True)
class Corpus:
    prompts: tuple[str, ...]
    source: str  # where the prompts came from, for the record
    held_out: tuple[str, ...] = ()  # prompts never trained on, scored apart (shapes)


def shapes_corpus() -> Corpus:
    """The shapes captions the teacher was trained on; its held-out captions stay out of distillation too."""
    from zimage_edge.shapes.data import all_scenes
    from zimage_edge.shapes.train import held_out_captions

    held = held_out_captions()
    return Corpus(tuple(s.caption for s in all_scenes() if s.caption not in held), "shapes captions", held)


def file_corpus(path: Path) -> Corpus:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = tuple(line for line in lines if line and not line.startswith("#"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return Corpus(prompts, f"prompt file {Path(path).name} ({len(prompts)} prompts)")


def corpus_for(teacher_dir: Path, prompts_file: Path | None) -> Corpus:
    if prompts_file is not None:
        return file_corpus(prompts_file)
    if (teacher_dir / SHAPES_MARKER).is_file():
        return shapes_corpus()
    raise ValueError(f"{teacher_dir} is not the shapes model: give a prompt list file (--prompts)")


def teacher_identity(teacher_dir: Path, teacher_id: str) -> StudentInfo:
    """The record a new student starts from: the teacher's, when the teacher is itself a student."""
    inherited = read_student_info(teacher_dir)
    if inherited is not None:
        return StudentInfo(inherited.teacher_id, inherited.teacher_sha256, dict(inherited.components), {})
    return StudentInfo(teacher_id, tree_digest(hash_tree(teacher_dir, skip=frozenset())))


def load_teacher(path: Path) -> Any:
    """A pipeline on the detected device in its policy dtype (fp32 on a CPU, bf16 on a recent GPU);
    students train in fp32 whatever the teacher computes in."""
    from zimage_edge.model.loading import load_pipeline

    return load_pipeline(path).pipe


def reference_pipe(teacher_dir: Path, info: StudentInfo, teacher_pipe: Any) -> Any:
    """What a student's quality is measured against: the first teacher when the direct one is itself a
    student and the first is at hand (a student of a student is compared with the model it replaces)."""
    first = Path(info.teacher_id)
    if read_student_info(teacher_dir) is not None and first.is_dir():
        return load_teacher(first)
    return teacher_pipe


def with_component(pipe: Any, name: str, module: Any) -> Any:
    """A pipeline sharing ``pipe``'s components but ``name``, cast to the teacher's dtype and device."""
    from diffusers import ZImagePipeline

    reference = getattr(pipe, name)
    parts = {n: getattr(pipe, n) for n in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")}
    parts[name] = module.to(device=reference.device, dtype=reference.dtype).eval()
    student = ZImagePipeline(**parts)
    student.set_progress_bar_config(disable=True)
    return student


def measure(teacher_pipe: Any, student_pipe: Any, corpus: Corpus, shapes: bool,
            seeds: Sequence[int] = (1000,)) -> dict[str, Any]:  # fmt: skip
    """PSNR/SSIM of the student's images against the teacher's (same prompts and seeds), and for the
    shapes model prompt adherence of both on every caption and on the held-out ones."""
    from quantize.quality import QualitySpec, compare, run_samples

    if shapes:
        from zimage_edge.shapes.data import IMAGE_SIZE

        prompts = tuple(corpus.prompts[:: max(1, len(corpus.prompts) // 8)][:8]) + corpus.held_out[:2]
        spec = QualitySpec(prompts=prompts, seeds=tuple(seeds), width=IMAGE_SIZE, height=IMAGE_SIZE)
    else:
        spec = QualitySpec(seeds=tuple(seeds))
    comparison = compare(run_samples(teacher_pipe, spec), run_samples(student_pipe, spec))
    quality: dict[str, Any] = {
        "prompts": list(spec.prompts), "seeds": list(spec.seeds), "width": spec.width, "height": spec.height,
        "steps": spec.steps,
        "psnr_db_mean": round(sum(comparison.psnr_db) / len(comparison.psnr_db), 3),
        "psnr_db_min": round(min(comparison.psnr_db), 3),
        "ssim_mean": round(sum(comparison.ssim) / len(comparison.ssim), 4),
        "ssim_min": round(min(comparison.ssim), 4),
    }  # fmt: skip
    if shapes:
        quality["adherence"] = {"teacher": shapes_adherence(teacher_pipe, seeds),
                                "student": shapes_adherence(student_pipe, seeds)}  # fmt: skip
    return quality


def shapes_adherence(pipe: Any, seeds: Sequence[int] = (1000,)) -> dict[str, Any]:
    """Adherence on all 90 captions and on the held-out ones (the same draw, scored twice)."""
    from zimage_edge.shapes.evaluate import draw_scenes, score
    from zimage_edge.shapes.train import held_out_captions

    drawn = draw_scenes(pipe, tuple(seeds))
    held = set(held_out_captions())
    return {"all": score(drawn), "held_out": score([(s, im) for s, im in drawn if s.caption in held])}


def save_student(pipe: Any, out: Path, info: StudentInfo, teacher_dir: Path) -> None:
    """Write the student pipeline (bf16 weights) and its records atomically."""
    from zimage_edge.model.saving import save_pipeline

    def records(directory: Path) -> None:
        write_student_info(directory, info)
        marker = teacher_dir / SHAPES_MARKER
        if marker.is_file():
            summary = json.loads(marker.read_text())
            adherence = info.quality.get("adherence", {}).get("student")
            if adherence:
                summary["adherence"] = adherence["all"]
                summary["adherence_held_out"] = adherence["held_out"]
            summary["distilled_from"] = info.teacher_id
            (directory / SHAPES_MARKER).write_text(json.dumps(summary, indent=2) + "\n")

    save_pipeline(pipe, out, records)


def _prepare(teacher: str | Path, out: Path, prompts_file: Path | None) -> tuple[Path, Corpus]:
    from zimage_edge.model.loading import resolve_source

    if out.exists():
        raise FileExistsError(f"{out} already exists")
    teacher_dir = resolve_source(teacher)
    return teacher_dir, corpus_for(teacher_dir, prompts_file)


def _run(
    component: str, teacher: str | Path, out: Path, *, prompts_file: Path | None, work_dir: Path | None,
    train: Callable[[Any, Sequence[str], Path], Any], summary: Callable[[Any, Any], dict[str, Any]],
) -> StudentInfo:  # fmt: skip
    """The steps both students share: the teacher and corpus, ``train`` (the recipe's distillation), the
    loss curve, the component's record (``summary`` of the result and the teacher pipeline), the student's
    quality against the teacher, and the student written to ``out``."""
    out = Path(out)
    teacher_dir, corpus = _prepare(teacher, out, prompts_file)
    work = Path(work_dir) if work_dir else out.with_name(out.name + WORK_SUFFIX)
    started = time.perf_counter()
    teacher_pipe = load_teacher(teacher_dir)
    info = teacher_identity(teacher_dir, str(teacher))
    result = train(teacher_pipe, corpus.prompts, work)
    write_loss_curve(work, f"{component.replace('_', '-')}-loss", result.losses)
    student_pipe = with_component(teacher_pipe, component, result.student)
    info.components[component] = {
        **summary(result, teacher_pipe), "corpus": corpus.source,
        "train_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    info.quality = measure(reference_pipe(teacher_dir, info, teacher_pipe), student_pipe, corpus,
                           (teacher_dir / SHAPES_MARKER).is_file())  # fmt: skip
    save_student(student_pipe, out, info, teacher_dir)
    return info


def run_transformer(
    teacher: str | Path, out: Path, recipe: TransformerRecipe, *, prompts_file: Path | None = None,
    work_dir: Path | None = None, report: Report | None = None,
) -> StudentInfo:  # fmt: skip
    """``zimage-edge distill transformer``: the whole recipe, written to ``out``."""
    from quantize.distill.transformer import distill_transformer

    def summary(result: Any, teacher_pipe: Any) -> dict[str, Any]:
        return {
            **result.summary(recipe),
            "params": sum(p.numel() for p in result.student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher_pipe.transformer.parameters()),
        }

    def train(pipe: Any, prompts: Sequence[str], work: Path) -> Any:
        return distill_transformer(pipe, prompts, recipe, work, report)

    return _run("transformer", teacher, out, prompts_file=prompts_file, work_dir=work_dir, train=train,
                summary=summary)  # fmt: skip


def run_text_encoder(
    teacher: str | Path, out: Path, recipe: TextEncoderRecipe, *, prompts_file: Path | None = None,
    work_dir: Path | None = None, report: Report | None = None,
) -> StudentInfo:  # fmt: skip
    """``zimage-edge distill text-encoder``: the whole recipe, written to ``out``."""
    from quantize.distill.text_encoder import distill_text_encoder

    def train(pipe: Any, prompts: Sequence[str], work: Path) -> Any:
        return distill_text_encoder(pipe, prompts, recipe, work, report)

    def summary(result: Any, teacher_pipe: Any) -> dict[str, Any]:
        teacher_params = sum(p.numel() for p in teacher_pipe.text_encoder.parameters())
        return dict(result.summary(recipe, teacher_params))

    return _run("text_encoder", teacher, out, prompts_file=prompts_file, work_dir=work_dir, train=train,
                summary=summary)  # fmt: skip


__all__ = ["STUDENT_MARKER", "Corpus", "run_text_encoder", "run_transformer", "shapes_corpus"]
