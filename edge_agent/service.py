"""The path every API shares: admit a request (readiness, guard, cache, queue), then wait for it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from edge_agent.api_models import apply_guard
from edge_agent.budget import OverBudget
from edge_agent.cache import cache_key
from edge_agent.errors import ApiError
from edge_agent.jobs import Interrupted, JobOutput, Work
from edge_agent.keys import AUTH, CACHE, CALLER, DENY, METRICS, RUNNER, SCHEDULER, SETTINGS, STATE
from edge_agent.runner import NoModel, OutOfMemory
from edge_agent.scheduler import Job, QueueFull
from zimage_edge.errors import GenerationCancelled
from zimage_edge.request import GenerationRequest

ANONYMOUS = "anonymous"

StepFn = Callable[[int, int], None]


@dataclass
class Admitted:
    request: GenerationRequest
    output_format: str
    job: Job | None = None
    cached: JobOutput | None = None
    cache_key: str | None = None


@dataclass
class Served:
    output: JobOutput
    job_id: str
    queue_wait: float
    cached: bool


def caller(request: web.Request) -> str:
    return str(request.get(CALLER, ANONYMOUS))


def default_size(app: web.Application) -> int:
    """The side a request that names no size gets: the loaded model's own, else the contract's."""
    identity = app[RUNNER].identity
    return identity.default_size if identity is not None else int(GenerationRequest.model_fields["width"].default)


def model_name(app: web.Application) -> str:
    """The loaded model's variant name, as the APIs answer it ("" while none is loaded)."""
    identity = app[RUNNER].identity
    return identity.variant if identity is not None else ""


def admit(
    request: web.Request, gen: GenerationRequest, *, output_format: str = "png", on_step: StepFn | None = None
) -> Admitted:
    """Checks that need no model work; queues the job (or finds it in the cache)."""
    app = request.app
    state = app[STATE]
    if not state.accepting:
        raise ApiError(503, "not_ready", f"not accepting work: {state.reason()}", headers={"Retry-After": "5"})
    apply_guard(gen, app[SETTINGS].guard, app[DENY])
    runner = app[RUNNER]
    # During a drain swap no model is loaded for a moment: requests queue for the next one unchecked
    # (the guard's static limits still applied), like any request admitted before a swap.
    identity, budget = runner.identity, runner.budget
    if budget is not None:
        try:
            budget.check(gen)
        except OverBudget as exc:
            raise ApiError(422, "over_device_budget", exc.message, field="num_images") from exc
    cache = app[CACHE]
    key = cache_key(identity.id, gen, output_format) if cache.max_bytes and identity is not None else None
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            app[METRICS].cache_hits.inc()
            return Admitted(gen, output_format, cached=hit)
        app[METRICS].cache_misses.inc()
    step = None
    if on_step is not None:
        loop = asyncio.get_running_loop()
        callback = on_step

        def step(done: int, total: int) -> None:  # runs in the model thread
            loop.call_soon_threadsafe(callback, done, total)

    try:
        job = app[SCHEDULER].submit(Work(gen, output_format, on_step=step, owner=caller(request)))
    except QueueFull as exc:
        retry = str(math.ceil(exc.retry_after))
        raise ApiError(429, "queue_full", "the generation queue is full", headers={"Retry-After": retry}) from exc
    return Admitted(gen, output_format, job=job, cache_key=key)


async def wait(request: web.Request, admitted: Admitted) -> Served:
    """Await the job within the request timeout; a client that leaves or times out frees its slot."""
    app = request.app
    if admitted.cached is not None:
        return Served(admitted.cached, "cache", 0.0, cached=True)
    job = admitted.job
    assert job is not None
    scheduler = app[SCHEDULER]
    try:
        output = await asyncio.wait_for(asyncio.shield(job.future), app[SETTINGS].queue.request_timeout_s)
    except TimeoutError as exc:
        scheduler.withdraw(job)
        raise ApiError(504, "timeout", "the request did not finish within its deadline") from exc
    except asyncio.CancelledError:
        scheduler.withdraw(job)  # the client disconnected: stop its work at the next step
        raise
    except OutOfMemory as exc:
        raise ApiError(503, "out_of_memory", str(exc), headers={"Retry-After": "10"}) from exc
    except Interrupted as exc:
        raise ApiError(409, "interrupted", f"the request was stopped: {exc.reason}") from exc
    except GenerationCancelled as exc:
        why = exc.reason or "the node is draining"
        raise ApiError(503, "cancelled", f"the request was stopped: {why}", headers={"Retry-After": "5"}) from exc
    except NoModel as exc:
        raise ApiError(503, "no_model", f"{exc}: {app[STATE].reason()}", headers={"Retry-After": "5"}) from exc
    _meter(request, admitted.request, output)
    if admitted.cache_key is not None:
        app[CACHE].put(admitted.cache_key, output)
    started = job.started_at if job.started_at is not None else job.enqueued_at
    return Served(output, job.id, started - job.enqueued_at, cached=False)


async def generate(
    request: web.Request, gen: GenerationRequest, *, output_format: str = "png", on_step: StepFn | None = None
) -> Served:
    return await wait(request, admit(request, gen, output_format=output_format, on_step=on_step))


def _meter(request: web.Request, gen: GenerationRequest, output: JobOutput) -> None:
    app = request.app
    name = caller(request)
    megapixel_steps = gen.width * gen.height / 1e6 * gen.steps * gen.num_images
    app[AUTH].record(name, images=len(output.images), megapixel_steps=megapixel_steps, gpu_seconds=output.gpu_seconds)
    metrics = app[METRICS]
    metrics.images.inc(len(output.images))
    metrics.usage_images.labels(name).inc(len(output.images))
    metrics.usage_megapixel_steps.labels(name).inc(megapixel_steps)
    metrics.usage_gpu_seconds.labels(name).inc(output.gpu_seconds)
