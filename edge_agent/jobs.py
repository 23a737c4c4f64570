"""What a queued job carries to the model thread and what comes back (torch-free plain data)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from zimage_edge.errors import GenerationCancelled
from zimage_edge.request import GenerationRequest

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class JobOutput:
    images: list[bytes]
    mime: str
    seeds: list[int]
    timings: dict[str, float | int]
    gpu_seconds: float


@dataclass(eq=False)
class Work:
    """What the runner needs of a job: the request, its output format, its cancel event, its progress."""

    request: GenerationRequest
    output_format: str = "png"
    cancel: threading.Event = field(default_factory=threading.Event)
    on_step: Callable[[int, int], None] | None = None
    owner: str = "anonymous"  # the API key that asked: only it may watch (progress) or stop the job
    step: int = 0  # denoising steps done, written by the model thread


class Interrupted(GenerationCancelled):
    """Its caller stopped the job (A1111 ``interrupt``/``skip``)."""
