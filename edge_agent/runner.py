"""The model runner: the loaded model, the one executor thread that drives it, and model swaps.

All model work (loading, generation, encoding the images it made) runs in executors owned here: one
worker thread for generation, because one GPU runs one batch at a time, and one for loading, so a
swap can load the next model while the current one keeps serving. The event loop only awaits.
This is the only module of the agent that touches the model stack, and it imports it lazily.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from edge_agent.budget import RequestBudget, make_budget
from edge_agent.jobs import MIME, JobOutput, Work
from edge_agent.noop import NoopPipe
from quantize.identity import LoadedModel, ModelIdentity
from quantize.profiles import DeviceProfile
from zimage_edge.errors import GenerationCancelled, ZimageEdgeError
from zimage_edge.request import MIN_SIDE, GenerationRequest

log = logging.getLogger(__name__)

Loader = Callable[[str], LoadedModel]
# ``generate_batch(pipe, requests, on_step=..., cancels=...)`` or a stand-in with its signature.
BatchFn = Callable[..., list[Any]]


@dataclass(frozen=True)
class Loaded:
    """A model ready to install, and its request budget."""

    model: LoadedModel
    budget: RequestBudget | None  # None: nothing to budget (the no-op model)


class OutOfMemory(ZimageEdgeError):
    """The device ran out of memory even for this request alone."""


class NoModel(ZimageEdgeError):
    """No model is loaded (a swap failed and the previous model could not be restored)."""


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


def default_batch_fn(pipe: Any, requests: Sequence[GenerationRequest], **kwargs: Any) -> list[Any]:
    if isinstance(pipe, NoopPipe):  # the benchmarking stand-in (edge_agent.noop)
        return pipe.generate_batch(requests, **kwargs)
    from zimage_edge.model.generate import generate_batch

    return generate_batch(pipe, requests, **kwargs)


class ModelRunner:
    def __init__(self, loader: Loader, batch_fn: BatchFn = default_batch_fn) -> None:
        self._loader = loader
        self._batch_fn = batch_fn
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-model")
        self.load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-load")
        self.model: LoadedModel | None = None
        self.budget: RequestBudget | None = None  # what the loaded model can take on this device

    @property
    def identity(self) -> ModelIdentity | None:
        """The loaded model's identity (None while no model is loaded)."""
        return self.model.identity if self.model is not None else None

    async def load(self, source: str, profile: DeviceProfile | None = None) -> Loaded:
        """Load ``source`` in the load thread, and work out what it can take on this device."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.load_executor, self._load_sync, source, profile)

    def _load_sync(self, source: str, profile: DeviceProfile | None) -> Loaded:
        model = self._loader(source)
        # The no-op model has no weights and allocates nothing: there is nothing to budget.
        budget = None if isinstance(model.pipe, NoopPipe) else make_budget(model, profile)
        return Loaded(model, budget)

    def install(self, loaded: Loaded) -> None:
        """Switch to ``loaded``; callers do it between batches."""
        self.model, self.budget = loaded.model, loaded.budget

    async def unload(self) -> None:
        """Drop the current model and return its memory (between batches)."""
        self.model = self.budget = None
        await self.release()

    async def release(self) -> None:
        """Return freed memory to the device (after a model was dropped)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, _free_device_cache)

    async def warm_model(self, loaded: Loaded) -> float:
        """One small generation on ``loaded`` (kernels, allocator, caches); returns its seconds."""
        request = GenerationRequest(prompt="warm-up", width=MIN_SIDE, height=MIN_SIDE, steps=1, seed=0)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self.executor, self._generate, loaded.model, [Work(request)])
        return time.perf_counter() - started

    async def run(self, batch: Sequence[Work]) -> list[JobOutput | BaseException]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_sync, list(batch))

    # --- in the model thread ---------------------------------------------------------------------

    def _run_sync(self, batch: list[Work]) -> list[JobOutput | BaseException]:
        model = self.model
        if model is None:
            return [NoModel("no model is loaded") for _ in batch]
        try:
            return self._generate(model, batch)
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

    def _generate(self, model: LoadedModel, batch: list[Work]) -> list[JobOutput | BaseException]:
        def on_step(done: int, total: int) -> None:
            for work in batch:
                work.step = done
                if work.on_step is not None and not work.cancel.is_set():
                    work.on_step(done, total)

        started = time.perf_counter()
        try:
            results = self._batch_fn(
                model.pipe, [w.request for w in batch], on_step=on_step, cancels=[w.cancel for w in batch]
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

    async def close(self) -> None:
        """Stop both executors; waits for a running batch or load in a thread, not on the event loop."""
        for executor in (self.executor, self.load_executor):
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
