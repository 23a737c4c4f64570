"""The app factory: ``create_app(settings)`` for the CLI and the tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from edge_agent import middleware
from edge_agent.auth import Authenticator
from edge_agent.cache import ResultCache
from edge_agent.images import ImageStore
from edge_agent.keys import AUTH, CACHE, DENY, IMAGES, METRICS, RUNNER, SCHEDULER, SETTINGS, STATE
from edge_agent.metrics import Metrics
from edge_agent.routes_generate import routes as generate_routes
from edge_agent.routes_ops import PAGE, load_page
from edge_agent.routes_ops import routes as ops_routes
from edge_agent.runner import BatchFn, Loader, ModelRunner
from edge_agent.scheduler import Scheduler
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState
from edge_agent.swap import SWAP_LOCK, describe_model
from zimage_edge.model.generate import generate_batch
from zimage_edge.model.loading import LoadedPipeline

log = logging.getLogger(__name__)


def default_loader(settings: AgentSettings) -> Loader:
    def load(source: str) -> LoadedPipeline:
        from quantize.artifact import load_model
        from quantize.signing import load_public_keys

        return load_model(source, trusted=load_public_keys(settings.trusted_keys))

    return load


def create_app(
    settings: AgentSettings, *, loader: Loader | None = None, batch_fn: BatchFn = generate_batch
) -> web.Application:
    """Build the agent. ``loader`` and ``batch_fn`` default to the real ones; tests may pass others."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[middleware.observe, middleware.errors, middleware.authenticate],
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics.create()
    app[STATE] = state = AgentState()
    app[METRICS].ready.set_function(lambda: float(state.ready))
    app[CACHE] = ResultCache(settings.cache.max_bytes)
    app[AUTH] = Authenticator(list(settings.api_keys))
    app[IMAGES] = ImageStore(settings.image_ttl_s)
    app[DENY] = [re.compile(p, re.IGNORECASE) for p in settings.guard.deny]
    app[SWAP_LOCK] = asyncio.Lock()
    app[PAGE] = load_page()
    app.add_routes(generate_routes)
    app.add_routes(ops_routes)
    app.cleanup_ctx.append(_runner_ctx(loader or default_loader(settings), batch_fn))
    return app


def _runner_ctx(
    loader: Loader, batch_fn: BatchFn
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def runner_ctx(app: web.Application) -> AsyncIterator[None]:
        runner = ModelRunner(loader, batch_fn)
        scheduler = Scheduler(runner, app[SETTINGS].queue, app[METRICS])
        app[RUNNER] = runner
        app[SCHEDULER] = scheduler
        loop_task = asyncio.create_task(scheduler.run_forever(), name="zimage-scheduler")
        start_task = asyncio.create_task(_warm_start(app), name="zimage-warm-start")
        try:
            yield
        finally:
            for task in (start_task, loop_task):
                task.cancel()
            for task in (start_task, loop_task):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Jobs still queued at this point had their drain grace period; they are told so.
            scheduler.cancel_all()
            runner.close()

    return runner_ctx


async def _warm_start(app: web.Application) -> None:
    """Load the model, run one small generation, then report ready. Logs ``model_loaded``."""
    settings, runner, state = app[SETTINGS], app[RUNNER], app[STATE]
    try:
        loaded = await runner.load(settings.model)
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
    log.info("model_loaded", extra={
        "event": "model_loaded", "source": settings.model, "variant": runner.identity.get("variant"),
        "dtype": loaded.policy.dtype, "device": loaded.device, "duration_sec": round(loaded.stats.seconds, 4),
        "warmup_sec": round(warm_sec, 4), "rss_delta": loaded.stats.rss_delta,
    })  # fmt: skip
    state.warm = True
    state.warmed.set()
