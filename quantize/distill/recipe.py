"""What a distillation run is asked to do, and what a student records about itself (torch-free)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Written beside ``model_index.json`` of a student; ``quantize`` carries it into the manifest.
STUDENT_MARKER = "zimage_edge_student.json"


@dataclass(frozen=True)
class TransformerRecipe:
    """Depth pruning of the transformer's main layers, then distillation on teacher trajectories."""

    keep: int
    steps: int = 1500
    batch: int = 32
    lr: float = 5e-4
    # Weight of the hidden-state matching term against the velocity term. The hidden states of a
    # kept layer are matched to the teacher layer it was copied from; 0.1 keeps the velocity (what the
    # sampler integrates) the main target while still anchoring the features of every kept layer.
    hidden_weight: float = 0.1
    seeds_per_prompt: int = 8  # teacher trajectories per prompt in the training set
    # How much more often states of the first half of the schedule are drawn than the others: the
    # composition (which shape, where) is decided in the first, noisiest steps, and an error there
    # carries through every later step. 1.0 draws uniformly.
    early_weight: float = 1.0
    selection_prompts: int = 8  # prompts whose trajectories score the layers for selection
    selection: str = "greedy"  # greedy: drop the least harmful layer, re-measure, repeat
    width: int = 64
    height: int = 64
    num_inference_steps: int = 8  # the Turbo schedule
    max_sequence_length: int = 64
    seed: int = 0
    checkpoint_every: int = 250


@dataclass(frozen=True)
class TextEncoderRecipe:
    """A smaller Qwen3 encoder plus a projection, trained on the teacher's caption features."""

    layers: int
    hidden: int
    intermediate: int = 0  # 0: twice ``hidden``
    heads: int = 2
    kv_heads: int = 1
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-3
    max_sequence_length: int = 64
    seed: int = 0
    checkpoint_every: int = 500

    @property
    def intermediate_size(self) -> int:
        return self.intermediate or 2 * self.hidden


@dataclass
class StudentInfo:
    """The student's own description: its teacher, how each distilled component was made, its quality."""

    teacher_id: str
    teacher_sha256: str
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> recipe and facts
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentInfo:
        return cls(
            teacher_id=str(data["teacher_id"]),
            teacher_sha256=str(data["teacher_sha256"]),
            components=dict(data.get("components", {})),
            quality=dict(data.get("quality", {})),
        )


def read_student_info(model_dir: Path) -> StudentInfo | None:
    """The student record of a model directory, or None when it is not a student."""
    path = Path(model_dir) / STUDENT_MARKER
    if not path.is_file():
        return None
    return StudentInfo.from_dict(json.loads(path.read_text()))


def write_student_info(model_dir: Path, info: StudentInfo) -> None:
    (Path(model_dir) / STUDENT_MARKER).write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")
