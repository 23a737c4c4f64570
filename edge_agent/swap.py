"""Hot model swap and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from edge_agent.keys import CACHE, METRICS, RUNNER, SCHEDULER, SETTINGS, STATE
from zimage_edge.device import detect_device
from zimage_edge.model.loading import LoadedPipeline

log = logging.getLogger(__name__)

SWAP_LOCK = web.AppKey("swap_lock", asyncio.Lock)
# Headroom over the new model's weights when deciding whether old and new fit side by side:
# weights are not all a model needs while loading (conversion buffers, allocator slack).
SWAP_HEADROOM = 1.25


def model_bytes(source: str) -> int:
    """Bytes of the weight files of an artifact or diffusers directory (0 when unknown)."""
    from pathlib import Path

    path = Path(source)
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def fits_beside(source: str) -> bool:
    """Whether ``source`` can load while the current model stays (blocking: file sizes, device query)."""
    return model_bytes(source) * SWAP_HEADROOM < detect_device().free_memory


def describe_model(app: web.Application, loaded: LoadedPipeline) -> None:
    identity = app[RUNNER].identity
    app[METRICS].model.info({k: str(identity.get(k, "")) for k in ("id", "variant", "dtype", "device", "artifact")})
    app[METRICS].model_load_seconds.set(loaded.stats.seconds)


async def swap_model(app: web.Application, source: str) -> dict[str, Any]:
    """Load ``source`` and switch to it between batches; the old model serves until then.

    When old and new cannot both fit, readiness goes down, the running batch finishes, the old model
    is unloaded and the new one loaded (queued requests wait); if that load fails, the old model is
    loaded again. A failed load never leaves the node without a model.
    """
    runner, scheduler, state = app[RUNNER], app[SCHEDULER], app[STATE]
    strategy = app[SETTINGS].swap_strategy
    async with app[SWAP_LOCK]:
        old = runner.loaded
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        overlap = strategy == "overlap" or (
            strategy == "auto" and await loop.run_in_executor(runner.load_executor, fits_beside, source)
        )
        if overlap:
            new = await runner.load(source)  # ModelLoadError/ArtifactError: the old model keeps serving
            await runner.warm_model(new)
            async with scheduler.lock:  # between batches
                runner.install(new)
            del old
            await runner.release()
        else:
            state.swapping = True
            scheduler.pause()
            try:
                async with scheduler.lock:
                    old_source = old.source if old else None
                    await runner.unload()
                    del old
                    try:
                        new = await runner.load(source)
                    except Exception:
                        if old_source is not None:
                            runner.install(await runner.load(old_source))
                        raise
                    runner.install(new)
            finally:
                scheduler.resume()
                state.swapping = False
        app[CACHE].clear()
        describe_model(app, new)
        seconds = time.perf_counter() - started
        log.info("model_swapped", extra={"event": "model_swapped", "source": source, "overlap": overlap,
                                         "duration_sec": round(seconds, 3)})  # fmt: skip
        return {"model": runner.identity, "strategy": "overlap" if overlap else "drain", "duration_sec": seconds}


async def drain(app: web.Application) -> int:
    """Stop taking work, let queued and running jobs finish within the grace period; returns how many
    jobs had to be cancelled when the grace period ran out."""
    state, scheduler = app[STATE], app[SCHEDULER]
    state.draining = True
    log.info("drain_started", extra={"event": "drain_started", "pending": len(scheduler.pending)})
    cancelled = 0
    try:
        await asyncio.wait_for(scheduler.wait_idle(), app[SETTINGS].drain_grace_s)
    except TimeoutError:
        cancelled = scheduler.cancel_all()
    state.drained.set()
    log.info("drain_done", extra={"event": "drain_done", "cancelled": cancelled})
    return cancelled
