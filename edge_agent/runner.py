"""The model runner: the loaded pipeline, the one executor thread that drives it, and model swaps.

All model work (loading, generation, encoding the images it made) runs in executors owned here: one
worker thread for generation, because one GPU runs one batch at a time, and one for loading, so a
swap can load the next model while the current one keeps serving. The event loop only awaits.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zimage_edge.model.generate import GenerationCancelled, GenerationResult, generate_batch
from zimage_edge.model.loading import LoadedPipeline
from zimage_edge.request import GenerationRequest

log = logging.getLogger(__name__)

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

Loader = Callable[[str], LoadedPipeline]
BatchFn = Callable[..., list[GenerationResult]]


class OutOfMemory(RuntimeError):
    """The device ran out of memory even for this request alone."""


@dataclass
class JobOutput:
    images: list[bytes]
    mime: str
    seeds: list[int]
    timings: dict[str, float | int]
    gpu_seconds: float
    cancelled: bool = False


@dataclass(eq=False)
class Work:
    """What the runner needs of a job: the request, its output format, its cancel event, its progress."""

    request: GenerationRequest
    output_format: str = "png"
    cancel: threading.Event = field(default_factory=threading.Event)
    on_step: Callable[[int, int], None] | None = None


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _free_device_cache() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode(image: Any, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def model_identity(loaded: LoadedPipeline) -> dict[str, Any]:
    """What is loaded, for /v1/models, metrics and cache keys."""
    manifest = loaded.manifest or {}
    variant = manifest.get("variant", {}).get("name", "diffusers")
    digest = manifest.get("source", {}).get("sha256", "")
    files = manifest.get("files", {})
    # An artifact is identified by the hashes of its files; a plain directory only by its path.
    listing = json.dumps(sorted((k, v["sha256"]) for k, v in files.items())) if files else loaded.source
    artifact_hash = hashlib.sha256(listing.encode()).hexdigest()
    return {
        "id": loaded.source,
        "variant": variant,
        "dtype": loaded.policy.dtype,
        "device": loaded.device,
        "source_sha256": digest,
        "artifact": artifact_hash,
        "quality": manifest.get("quality"),
        "components": manifest.get("components"),
    }


class ModelRunner:
    def __init__(self, loader: Loader, batch_fn: BatchFn = generate_batch) -> None:
        self._loader = loader
        self._batch_fn = batch_fn
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-model")
        self.load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-load")
        self.loaded: LoadedPipeline | None = None
        self.identity: dict[str, Any] = {}

    async def load(self, source: str) -> LoadedPipeline:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.load_executor, self._loader, source)

    def install(self, loaded: LoadedPipeline) -> None:
        """Switch to ``loaded``; callers do it between batches."""
        self.loaded = loaded
        self.identity = model_identity(loaded)

    async def unload(self) -> None:
        """Drop the current model and return its memory (between batches)."""
        self.loaded = None
        await self.release()

    async def release(self) -> None:
        """Return freed memory to the device (after a model was dropped)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, _free_device_cache)

    async def warm_model(self, loaded: LoadedPipeline) -> float:
        """One small generation on ``loaded`` (kernels, allocator, caches); returns its seconds."""
        request = GenerationRequest(prompt="warm-up", width=64, height=64, steps=1, seed=0)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self.executor, self._generate, loaded, [Work(request)])
        return time.perf_counter() - started

    async def run(self, batch: Sequence[Work]) -> list[JobOutput | BaseException]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_sync, list(batch))

    # --- in the model thread ---------------------------------------------------------------------

    def _run_sync(self, batch: list[Work]) -> list[JobOutput | BaseException]:
        loaded = self.loaded
        if loaded is None:
            return [RuntimeError("no model is loaded") for _ in batch]
        try:
            return self._generate(loaded, batch)
        except BaseException as exc:
            if not _is_oom(exc):
                raise
            _free_device_cache()
            if len(batch) == 1:
                log.warning("oom", extra={"event": "oom", "images": batch[0].request.num_images})
                return [OutOfMemory("the device ran out of memory for this request; try a smaller size")]
            # Retry in halves: the other half may well fit once the first is done.
            log.warning("oom_split", extra={"event": "oom_split", "batch": len(batch)})
            middle = len(batch) // 2
            return self._run_sync(batch[:middle]) + self._run_sync(batch[middle:])

    def _generate(self, loaded: LoadedPipeline, batch: list[Work]) -> list[JobOutput | BaseException]:
        def on_step(done: int, total: int) -> None:
            for work in batch:
                if work.on_step is not None and not work.cancel.is_set():
                    work.on_step(done, total)

        started = time.perf_counter()
        try:
            results = self._batch_fn(
                loaded.pipe, [w.request for w in batch], on_step=on_step, cancels=[w.cancel for w in batch]
            )
        except GenerationCancelled as exc:
            return [exc for _ in batch]
        elapsed = time.perf_counter() - started
        total_images = sum(w.request.num_images for w in batch) or 1
        outputs: list[JobOutput | BaseException] = []
        for work, result in zip(batch, results, strict=True):
            if result.cancelled:
                outputs.append(GenerationCancelled(0, work.request.steps))
                continue
            outputs.append(
                JobOutput(
                    images=[encode(image, work.output_format) for image in result.images],
                    mime=MIME[work.output_format],
                    seeds=result.seeds,
                    timings=result.timings.to_dict(),
                    # The batch's time, shared by images: what metering charges each request.
                    gpu_seconds=elapsed * work.request.num_images / total_images,
                )
            )
        return outputs

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.load_executor.shutdown(wait=True, cancel_futures=True)
