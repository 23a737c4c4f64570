"""The app factory: ``create_app(settings)`` for the CLI and the tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from edge_agent import middleware
from edge_agent.auth import Authenticator
from edge_agent.cache import ResultCache
from edge_agent.images import ImageStore
from edge_agent.keys import (
    AUTH,
    CACHE,
    CLOCK,
    CPU_THREADS,
    DENY,
    IMAGES,
    METRICS,
    MODELS,
    PAGE,
    RUNNER,
    SCHEDULER,
    SETTINGS,
    STATE,
    SWAP_LOCK,
    SWAPS,
)  # fmt: skip
from edge_agent.metrics import Metrics
from edge_agent.noop import NOTE, is_noop, load_noop
from edge_agent.routes_a1111 import routes as a1111_routes
from edge_agent.routes_generate import routes as generate_routes
from edge_agent.routes_ops import load_page
from edge_agent.routes_ops import routes as ops_routes
from edge_agent.runner import BatchFn, Loader, ModelRunner, default_batch_fn
from edge_agent.scheduler import Clock, Scheduler
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState
from edge_agent.swap import describe_model, planning_profile
from quantize.identity import LoadedModel
from zimage_edge.cpu import ThreadDecision, decide_threads, read_cpu

log = logging.getLogger(__name__)


def default_loader(settings: AgentSettings) -> Loader:
    def load(source: str) -> LoadedModel:
        if is_noop(source):
            log.warning("noop_model", extra={"event": "noop_model", "source": source, "note": NOTE})
            return load_noop(source)
        from quantize.models import load_model
        from quantize.signing import load_public_keys

        return load_model(source, trusted=load_public_keys(settings.trusted_keys))

    return load


def create_app(
    settings: AgentSettings,
    *,
    loader: Loader | None = None,
    batch_fn: BatchFn = default_batch_fn,
    clock: Clock = time.monotonic,
    cpu: ThreadDecision | None = None,
) -> web.Application:
    """Build the agent. ``loader`` and ``batch_fn`` default to the real ones; tests may pass others,
    and a ``clock`` (monotonic seconds) that batching windows, rate limits and image expiry all read.
    ``cpu`` is the thread policy the process applied (``serve`` applies it before torch loads); without
    it the policy is computed from the settings, not applied (tests, embedding)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[middleware.observe, middleware.errors, middleware.authenticate],
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[METRICS] = Metrics.create()
    app[CPU_THREADS] = cpu or decide_threads(read_cpu(), threads=settings.cpu.threads, share=settings.cpu.share)
    app[METRICS].cpu_threads.set(app[CPU_THREADS].intra_op)
    app[STATE] = state = AgentState()
    app[METRICS].ready.set_function(lambda: float(state.ready))
    app[CACHE] = ResultCache(settings.cache.max_bytes)
    app[AUTH] = Authenticator(list(settings.api_keys), clock=clock)
    app[IMAGES] = ImageStore(settings.image_ttl_s, max_bytes=settings.image_store_max_bytes, clock=clock)
    app[DENY] = [re.compile(p, re.IGNORECASE) for p in settings.guard.deny]
    app[SWAP_LOCK] = asyncio.Lock()
    app[SWAPS] = set()
    app[MODELS] = {}
    app[PAGE] = load_page()
    app.add_routes(generate_routes)
    app.add_routes(a1111_routes)
    app.add_routes(ops_routes)
    app.cleanup_ctx.append(_runner_ctx(loader or default_loader(settings), batch_fn))
    return app


def _runner_ctx(
    loader: Loader, batch_fn: BatchFn
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def runner_ctx(app: web.Application) -> AsyncIterator[None]:
        runner = ModelRunner(loader, batch_fn)
        scheduler = Scheduler(runner, app[SETTINGS].queue, app[METRICS], clock=app[CLOCK])
        app[RUNNER] = runner
        app[SCHEDULER] = scheduler
        loop_task = asyncio.create_task(scheduler.run_forever(), name="zimage-scheduler")
        start_task = asyncio.create_task(_warm_start(app), name="zimage-warm-start")
        try:
            yield
        finally:
            tasks = [start_task, loop_task, *app[SWAPS]]
            for task in tasks:
                task.cancel()
            # Their failures were logged where they happened (warm start, swap outcome).
            await asyncio.gather(*tasks, return_exceptions=True)
            # Jobs still queued at this point had their drain grace period; they are told so.
            scheduler.stop_all("the node is shutting down")
            await runner.close()

    return runner_ctx


async def _warm_start(app: web.Application) -> None:
    """Load the model, run one small generation, then report ready. Logs ``model_loaded``."""
    settings, runner, state = app[SETTINGS], app[RUNNER], app[STATE]
    try:
        loaded = await runner.load(settings.model, planning_profile(app))
        runner.install(loaded)
        describe_model(app, loaded)
        warm_sec = await runner.warm_model(loaded) if settings.warmup else 0.0
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.failed = str(exc)
        log.exception("model_load_failed", extra={"event": "model_load_failed", "source": settings.model})
        state.warmed.set()
        return
    identity, stats = loaded.model.identity, loaded.model.pipeline.stats
    log.info("model_loaded", extra={
        "event": "model_loaded", "source": settings.model, "variant": identity.variant,
        "artifact_id": identity.id, "dtype": identity.dtype, "device": identity.device,
        "duration_sec": round(stats.seconds, 4), "warmup_sec": round(warm_sec, 4), "rss_delta": stats.rss_delta,
    })  # fmt: skip
    state.warm = True
    state.warmed.set()
