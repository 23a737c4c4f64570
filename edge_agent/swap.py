"""Hot model swap and graceful drain.

A swap runs as a task of the app, not of the HTTP request that asked for it: a client that
disconnects (or times out) mid-swap cancels only its wait, never the swap, so the node is never left
between two models. Swaps are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from edge_agent.keys import CACHE, METRICS, MODELS, RUNNER, SCHEDULER, SETTINGS, STATE, SWAP_LOCK, SWAPS
from edge_agent.runner import Loaded
from quantize.models import inspect_source
from quantize.profiles import DeviceProfile, get_profile
from quantize.signing import load_public_keys
from zimage_edge.device import detect_device
from zimage_edge.errors import ZimageEdgeError

log = logging.getLogger(__name__)

# Headroom over the new model's weights when deciding whether old and new fit side by side:
# weights are not all a model needs while loading (conversion buffers, allocator slack).
SWAP_HEADROOM = 1.25


class ModelLost(ZimageEdgeError):
    """A drain swap failed and the previous model could not be loaded again: the node has no model."""


def fits_beside(weight_bytes: int) -> bool:
    """Whether a model of ``weight_bytes`` can load while the current one stays (blocking: device query)."""
    return weight_bytes * SWAP_HEADROOM < detect_device().free_memory


def planning_profile(app: web.Application) -> DeviceProfile | None:
    """The device profile requests are budgeted against: the configured one, else the detected device."""
    name = app[SETTINGS].device_profile
    return get_profile(name) if name else None


def describe_model(app: web.Application, loaded: Loaded) -> None:
    """Publish what is now loaded: metrics, and the list of models this node has served (A1111)."""
    identity = loaded.model.identity
    app[MODELS][identity.id] = identity
    app[METRICS].model.info({
        "artifact_id": identity.id, "variant": identity.variant, "source": identity.source,
        "dtype": identity.dtype, "device": identity.device,
    })  # fmt: skip
    app[METRICS].model_load_seconds.set(loaded.model.pipeline.stats.seconds)


def start_swap(app: web.Application, source: str) -> asyncio.Task[dict[str, Any]]:
    """Start a swap owned by the app (cancelled only at shutdown); callers await it shielded."""
    task = asyncio.create_task(swap_model(app, source), name="zimage-swap")
    app[SWAPS].add(task)
    task.add_done_callback(app[SWAPS].discard)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[dict[str, Any]]) -> None:
    """A swap's failure is logged here, whether or not its client is still waiting for the answer."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("swap_failed", extra={"event": "swap_failed", "error": str(exc)})


async def swap_model(app: web.Application, source: str) -> dict[str, Any]:
    """Load ``source`` and switch to it between batches; the old model serves until then.

    The source is checked first (layout, manifest, trust) without reading its weights. When old
    and new cannot both fit, readiness goes down, the running batch finishes, the old model is
    unloaded and the new one loaded (queued requests wait); if that load fails, the old model is
    loaded again, and if even that fails the node reports no model (not ready) and says so.
    """
    runner, scheduler, state, settings = app[RUNNER], app[SCHEDULER], app[STATE], app[SETTINGS]
    profile = planning_profile(app)
    async with app[SWAP_LOCK]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        trusted = load_public_keys(settings.trusted_keys)
        weight_bytes = await loop.run_in_executor(runner.load_executor, inspect_source, source, trusted)
        overlap = settings.swap_strategy == "overlap" or (
            settings.swap_strategy == "auto"
            and await loop.run_in_executor(runner.load_executor, fits_beside, weight_bytes)
        )
        if overlap:
            new = await runner.load(source, profile)  # a failure here leaves the old model serving
            await runner.warm_model(new)
            async with scheduler.lock:  # between batches
                runner.install(new)
            await runner.release()
        else:
            new = await _drain_swap(app, source, profile)
        state.lost = None
        app[CACHE].clear()
        describe_model(app, new)
        seconds = time.perf_counter() - started
        log.info("model_swapped", extra={"event": "model_swapped", "source": source, "overlap": overlap,
                                         "duration_sec": round(seconds, 3)})  # fmt: skip
        identity = new.model.identity
        return {"model": identity.summary(), "strategy": "overlap" if overlap else "drain", "duration_sec": seconds}


async def _drain_swap(app: web.Application, source: str, profile: DeviceProfile | None) -> Loaded:
    runner, scheduler, state = app[RUNNER], app[SCHEDULER], app[STATE]
    state.swapping = True
    scheduler.pause()
    try:
        async with scheduler.lock:
            old_source = runner.identity.source if runner.identity else None
            await runner.unload()
            try:
                new = await runner.load(source, profile)
            except BaseException as exc:  # a failed load, or the app shutting down mid-swap
                if old_source is not None:
                    await _restore(app, old_source, profile, exc)
                raise
            runner.install(new)
            return new
    finally:
        scheduler.resume()
        state.swapping = False


async def _restore(app: web.Application, old_source: str, profile: DeviceProfile | None, why: BaseException) -> None:
    runner, state = app[RUNNER], app[STATE]
    try:
        runner.install(await runner.load(old_source, profile))
    except Exception as exc:
        state.lost = f"loading the new model failed ({why}) and reloading {old_source} failed ({exc})"
        log.exception("model_lost", extra={"event": "model_lost", "source": old_source})
        raise ModelLost(state.lost) from exc


async def drain(app: web.Application) -> int:
    """Stop taking work, let queued and running jobs finish within the grace period; returns how many
    jobs had to be stopped when the grace period ran out (their clients get a 503)."""
    state, scheduler = app[STATE], app[SCHEDULER]
    state.draining = True
    log.info("drain_started", extra={"event": "drain_started", "pending": len(scheduler.pending)})
    stopped = 0
    try:
        await asyncio.wait_for(scheduler.wait_idle(), app[SETTINGS].drain_grace_s)
    except TimeoutError:
        stopped = scheduler.stop_all("the node is shutting down")
    state.drained.set()
    log.info("drain_done", extra={"event": "drain_done", "cancelled": stopped})
    return stopped
