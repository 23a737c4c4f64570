"""The no-op model: a benchmarking stand-in that draws nothing, so that what is left is the agent.

``zimage-edge serve --model noop`` (or ``noop:SIDE``) serves it. Every request still takes the whole
path a real one takes (HTTP parsing, auth, the guard, the queue and micro-batching, the hop to the
model thread, PNG/JPEG encoding, the answer); only the batch function returns at once, with a flat
gray image of the requested size per image. It exists to measure the agent's own overhead
(``zimage-edge bench agent``) and is never a model: its variant is ``noop`` and ``/v1/models`` marks
it ``benchmark_only``. It has no weights, so nothing is budgeted for it and it cannot be swapped in.

Importing this module is torch-free; ``load_noop`` builds the model stack's types, in the load thread.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from zimage_edge.errors import GenerationCancelled, ZimageEdgeError
from zimage_edge.request import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, GenerationRequest

if TYPE_CHECKING:
    from quantize.identity import LoadedModel

NOOP_VARIANT = "noop"
# The model's own side when ``noop`` names none: the smallest request, the cheapest image to encode.
DEFAULT_SIDE = 64
# Flat mid-gray: plainly not a drawing, and it compresses to a few hundred bytes as PNG.
GRAY = (128, 128, 128)
NOTE = "no-op benchmarking model: returns a flat gray image without running any model"


class NoopSourceError(ZimageEdgeError):
    """A ``noop:...`` source that names no valid side."""


def noop_side(source: str) -> int | None:
    """The side ``source`` names when it is ``noop`` or ``noop:SIDE``; None for any other source."""
    name, sep, side = source.partition(":")
    if name != NOOP_VARIANT:
        return None
    if not sep:
        return DEFAULT_SIDE
    if not side.isdigit():
        raise NoopSourceError(f"{source!r}: the no-op model is 'noop' or 'noop:SIDE' with SIDE a number")
    value = int(side)
    if not MIN_SIDE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        raise NoopSourceError(
            f"{source!r}: SIDE must be a multiple of {SIZE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}"
        )
    return value


def is_noop(source: str) -> bool:
    return source.partition(":")[0] == NOOP_VARIANT


class NoopPipe:
    """Stands where a pipeline stands; ``generate_batch`` is its whole behaviour."""

    def __init__(self, side: int, latents: Any) -> None:
        self.side = side
        self.latents = latents  # an empty tensor, shared by every result: there are no latents
        # One image per size, made once: later requests of that size cost a dict lookup.
        self._images: dict[tuple[int, int], Image.Image] = {}

    def image(self, width: int, height: int) -> Image.Image:
        image = self._images.get((width, height))
        if image is None:
            image = self._images[(width, height)] = Image.new("RGB", (width, height), GRAY)
        return image

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: Any = None,
        cancels: Sequence[threading.Event | None] | None = None,
    ) -> list[Any]:
        """What ``generate_batch`` returns, at once: the progress callbacks, seeds and images, no work."""
        from zimage_edge.model.generate import GenerationResult, Timings, resolve_seeds

        if not requests:
            return []
        started = time.perf_counter()
        first = requests[0]
        events = list(cancels) if cancels is not None else [None] * len(requests)
        if all(event is not None and event.is_set() for event in events):
            raise GenerationCancelled(0, first.steps)
        if on_step is not None:
            for step in range(1, first.steps + 1):
                on_step(step, first.steps)
        total = time.perf_counter() - started
        timings = Timings(0.0, 0.0, 0.0, total, first.steps, sum(r.num_images for r in requests))
        results = []
        for request, event in zip(requests, events, strict=True):
            cancelled = event is not None and event.is_set()
            images = [] if cancelled else [self.image(request.width, request.height)] * request.num_images
            results.append(GenerationResult(request, images, resolve_seeds(request), timings, self.latents, cancelled))
        return results


def load_noop(source: str) -> LoadedModel:
    """The no-op model as the runner holds a loaded one (blocking only for a moment: no weights)."""
    from pathlib import Path

    import torch

    from quantize.identity import LoadedModel, ModelIdentity
    from zimage_edge.device import DeviceFacts, DeviceKind, dtype_policy, read_meminfo
    from zimage_edge.model.loading import LoadedPipeline, LoadStats

    started = time.perf_counter()
    side = noop_side(source)
    if side is None:
        raise NoopSourceError(f"{source!r} is not the no-op model")
    memory = read_meminfo()
    facts = DeviceFacts(
        kind=DeviceKind.CPU, name=NOTE, total_memory=memory.total, free_memory=memory.available,
        unified_memory=True, system_memory=memory.total,
    )  # fmt: skip
    pipeline = LoadedPipeline(
        pipe=NoopPipe(side, torch.empty(0)),
        source=source,
        path=Path(source),
        facts=facts,
        policy=dtype_policy(facts),
        stats=LoadStats(seconds=time.perf_counter() - started, rss_before=0, rss_after=0),
    )
    identity = ModelIdentity(
        id=hashlib.sha256(f"noop:{side}".encode()).hexdigest(),
        source=source,
        variant=NOOP_VARIANT,
        dtype="none",
        device="cpu",
        default_size=side,
    )
    return LoadedModel(pipeline, identity)
