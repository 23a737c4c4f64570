"""Which of the teacher's main layers to keep, and the student built from them.

Selection is measured: with a candidate set of layers the teacher runs on its own trajectories and the
error of its velocity against the full teacher's is the cost of leaving the others out. Greedy
pruning removes, one at a time, the layer whose removal costs least given the ones already removed
(TinyFusion's observation: the cheapest layers to drop are not the ones with the smallest weights).
Running a subset only swaps the ``layers`` list of the teacher, so the real 30-layer model is measured
without a copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantize.distill.trajectories import Trajectories, velocity


@contextmanager
def only_layers(transformer: Any, kept: Sequence[int]) -> Iterator[None]:
    """Run ``transformer`` with only its main layers ``kept`` (in order) for the duration."""
    full = transformer.layers
    transformer.layers = nn.ModuleList([full[i] for i in kept])
    try:
        yield
    finally:
        transformer.layers = full


@torch.no_grad()
def output_error(transformer: Any, data: Trajectories, kept: Sequence[int], reference: torch.Tensor,
                 batch: int = 64) -> float:  # fmt: skip
    """Mean squared error of the velocity with only ``kept`` layers against ``reference`` (the full teacher's)."""
    total = 0.0
    with only_layers(transformer, kept):
        for start in range(0, len(data), batch):
            index = torch.arange(start, min(start + batch, len(data)))
            out = velocity(transformer, *data.batch(index, transformer.device)).cpu()
            total += float(((out - reference[index]) ** 2).sum())
    return total / reference.numel()


@dataclass(frozen=True)
class Selection:
    kept: tuple[int, ...]
    # (layer removed, error of the remaining set) in the order the greedy search removed them.
    removals: tuple[tuple[int, float], ...]
    single_drop_errors: dict[int, float]  # error when only that one layer is left out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": list(self.kept),
            "removals": [{"layer": layer, "error": err} for layer, err in self.removals],
            "single_drop_errors": {str(k): v for k, v in self.single_drop_errors.items()},
        }


@torch.no_grad()
def select_layers(transformer: Any, data: Trajectories, keep: int) -> Selection:
    """Greedy depth pruning to ``keep`` main layers, scored on the teacher's trajectories."""
    n = len(transformer.layers)
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be between 1 and the teacher's {n} main layers, not {keep}")
    index = torch.arange(len(data))
    reference = torch.cat(
        [
            velocity(transformer, *data.batch(index[s : s + 64], transformer.device)).cpu()
            for s in range(0, len(data), 64)
        ]
    )
    everything = list(range(n))
    single = {i: output_error(transformer, data, [j for j in everything if j != i], reference) for i in everything}
    kept = list(everything)
    removals: list[tuple[int, float]] = []
    while len(kept) > keep:
        costs = {i: output_error(transformer, data, [j for j in kept if j != i], reference) for i in kept}
        drop = min(costs, key=lambda i: costs[i])
        kept.remove(drop)
        removals.append((drop, costs[drop]))
    return Selection(tuple(kept), tuple(removals), single)


def build_student(teacher: Any, kept: Sequence[int]) -> Any:
    """A ``ZImageTransformer2DModel`` with ``len(kept)`` main layers: every other module is the teacher's,
    main layer j is the teacher's layer ``kept[j]`` (weights copied, equal before training)."""
    from diffusers import ZImageTransformer2DModel

    config = dict(teacher.config)
    config["n_layers"] = len(kept)
    student = ZImageTransformer2DModel.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        name = key
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            if int(index) not in kept:
                continue
            name = f"layers.{list(kept).index(int(index))}.{rest}"
        state[name] = value
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).dtype)
